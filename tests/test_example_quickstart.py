"""examples/quickstart.py runs to the end and labels its deliberate IndexError as expected."""


def test_quickstart_ends_with_the_expected_error(load_example, capsys):
    load_example("quickstart").main()
    lines = capsys.readouterr().out.splitlines()
    assert "linen output shape: (32, 10, 64)" in lines
    assert "attend logits shape: (32, 10, 1000)" in lines
    assert lines[-2].startswith("Expected: id 1000 is out of range")
    assert "got id 1000" in lines[-1]
