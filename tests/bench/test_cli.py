import pytest

from specllava.cli import build_parser


def test_bench_parser_defaults_and_checks(capsys):
    parser = build_parser()
    args = parser.parse_args(["bench"])
    assert args.set == ["in-domain"] and args.temperature == [0.0] and args.threads == 2
    assert args.methods == ("hf", "hf-assisted", "ar", "chain", "static", "dynamic")
    args = parser.parse_args(["bench", "--methods", "hf,dynamic", "--budget", "auto", "--tree-option", "max_depth=4",
                              "--calibration-prompts", "3"])
    assert args.methods == ("hf", "dynamic") and args.budget == "auto" and args.tree_option == [("max_depth", 4)]
    assert args.calibration_prompts == 3
    args = parser.parse_args(["bench", "--variant", "shallow=dynamic:max_depth=3,min_feed_mass=0.3", "--variant", "c3=chain:chain_length=3"])
    assert args.variant == [("shallow", ("dynamic", {"max_depth": 3, "min_feed_mass": 0.3})), ("c3", ("chain", {"chain_length": 3}))]
    assert parser.parse_args(["bench", "--variant", "v=dynamic:draft_vocab=4096"]).variant == [("v", ("dynamic", {"draft_vocab": 4096}))]
    assert parser.parse_args(["bench", "--variant", "bf=dynamic:draft_quant=none"]).variant == [("bf", ("dynamic", {"draft_quant": "none"}))]
    assert parser.parse_args(["bench", "--variant", "h=dynamic:draft_lean=false"]).variant == [("h", ("dynamic", {"draft_lean": False}))]
    assert parser.parse_args(["bench", "--variant", "a=ar:target_lean=false"]).variant == [("a", ("ar", {"target_lean": False}))]
    assert parser.parse_args(["bench", "--variant", "e=dynamic:draft=eagle"]).variant == [("e", ("dynamic", {"draft": "eagle"}))]
    assert parser.parse_args(["bench", "--variant", "o=dynamic:draft=other"]).variant == [("o", ("dynamic", {"draft": "other"}))]
    assert args.draft_quant == "auto" and parser.parse_args(["bench", "--draft-quant", "none"]).draft_quant == "none"
    bad_variants = (["--variant", "x=dynamic:draft_vocab=0"], ["--variant", "x=dynamic:draft_quant=int4"], ["--variant", "x=dynamic:draft_lean=2"], ["--draft-quant", "fp8"], ["--variant", "x=hf"], ["--variant", "x=ar:max_depth=3"], ["--variant", "dynamic"], ["--variant", "x=dynamic:depth=3"], ["--variant", "x=dynamic:max_depth=0"], ["--variant", "x=dynamic:draft=mine"])
    for bad in (["--methods", "hf,fast"], ["--budget", "0"], ["--budget", "big"], *bad_variants):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", *bad])
