"""The README's main command: the demo answers with the default model, and the tiny-random mode
matches transformers."""

from default_model.demo import main


def test_demo_chats_with_the_default_model(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "85<turn|>" in out  # 38 + 47
    assert "misa bero kano<turn|>" in out
    assert 'call:get_weather{location:<|"|>Lisbon<|"|>}' in out
    assert "pages in use after: {'sliding_attention': 0, 'full_attention': 0}" in out


def test_demo_tiny_random_mode_matches_transformers(capsys):
    assert main(["--tiny-random", "26b_a4b", "--max-tokens", "16"]) == 0
    assert "identical to transformers generate: yes" in capsys.readouterr().out
