import pytest

from univ.errors import UnivError
from univ.options import parse_count, parse_layers


@pytest.mark.parametrize("text, value", [("1M", 10**6), ("250k", 250_000), ("10000", 10_000), ("1.5m", 1_500_000), ("10_000", 10_000)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["0", "-5", "abc", "1.00001k", ""])
def test_parse_count_rejects(text):
    with pytest.raises(UnivError):
        parse_count(text)


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0,3,5-7", 8) == [0, 3, 5, 6, 7]
    assert parse_layers("2, 1", 3) == [1, 2]


@pytest.mark.parametrize("text", ["8", "0-8", "-9", "x", "3-1"])
def test_parse_layers_rejects(text):
    with pytest.raises(UnivError):
        parse_layers(text, 8)


def test_negative_layers_count_from_the_end():
    from univ.errors import UnivError
    from univ.options import parse_layers

    assert parse_layers("-1", 12) == [11] and parse_layers("0,-2", 12) == [0, 10]
    with pytest.raises(UnivError, match="out of range"):
        parse_layers("-13", 12)
