import torch

from blt_lightning.vocab import BOS, EOS, OFFSET, VOCAB_SIZE, decode, document_ids, encode


def test_layout_matches_the_reference():
    assert (VOCAB_SIZE, OFFSET, BOS, EOS) == (260, 4, 1, 2)
    assert encode(b"A").tolist() == [BOS, ord("A") + 4, EOS]


def test_round_trip_keeps_invalid_utf8():
    data = "naïve 字节 ".encode() + b"\xff\xfe\x80 broken"
    ids = encode(data)
    assert ids.dtype == torch.long and len(ids) == len(data) + 2
    assert ids[1:-1].min() >= OFFSET and ids.max() < VOCAB_SIZE
    assert decode(ids) == data


def test_every_byte_value_round_trips():
    data = bytes(range(256))
    assert decode(encode(data)) == data
    assert encode(b"").tolist() == [BOS, EOS]


def test_document_ids_split_at_bos():
    row = torch.cat([torch.tensor([70, 71, EOS]), encode(b"ab"), encode(b"c")])  # tail of a document, then two
    assert document_ids(row).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
