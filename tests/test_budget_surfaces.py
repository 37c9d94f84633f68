"""One budget vocabulary on every surface: the same (budget, layers) input gives the same k or the same error
through the Python API, the CLI, the server's request parsing and the lm-eval model (tiny 6-layer checkpoint)."""

import json

import pytest

from buddy.budget import BudgetError, budget_echo, request_budget

L = 6
# (budget, layers) -> k, or an error fragment. Values are given as Python/JSON values; the CLI and lm-eval
# get their text, as a user types them.
TABLE = [
    ((None, None), 6),
    ((0.5, None), 3),
    ((1, None), 6),
    ((1.0, None), 6),
    ((0.34, None), 2),
    ((None, 2), 2),
    ((None, 4), 4),
    ((None, 6), 6),
    ((2, None), "layers=2"),
    ((6, None), "layers=6"),
    ((0.5, 4), "not both"),
    ((None, 7), "[2, 6]"),
    ((None, 1), ">= 2"),
    ((0, None), "(0, 1]"),
    ((-0.5, None), "(0, 1]"),
    ((1.5, None), "(0, 1]"),
    (("abc", None), "invalid budget"),
    ((None, "many"), "invalid layers"),
]


def _text(v):
    return None if v is None else str(v)


def expect(expected, fn):
    if isinstance(expected, int):
        assert fn() == expected
    else:
        with pytest.raises((BudgetError, ValueError), match=None) as e:
            fn()
        assert expected in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from buddy.api import load

    return load(str(tiny_ckpt), planner="random", device="cpu", dtype="float32")


@pytest.mark.parametrize("inp,expected", TABLE, ids=[str(x[0]) for x in TABLE])
def test_python_api(engine, inp, expected):
    expect(expected, lambda: engine.resolve_k(*inp))


@pytest.mark.parametrize("inp,expected", TABLE, ids=[str(x[0]) for x in TABLE])
def test_server_request(engine, inp, expected):
    from buddy.serve.app import APIError, Server

    server = Server({"fill": engine}, "tiny")
    body = {"prompt": "w1 w2", "max_tokens": 2, **{n: v for n, v in zip(("budget", "layers"), inp) if v is not None}}
    if isinstance(expected, int):
        _, o = server.parse(body, chat=False)
        assert o["k"] == expected
    else:
        with pytest.raises(APIError) as e:
            server.parse(body, chat=False)
        assert e.value.status == 400 and expected in e.value.message


@pytest.mark.parametrize("inp,expected", TABLE, ids=[str(x[0]) for x in TABLE])
def test_cli(tiny_ckpt, tmp_path, capsys, inp, expected):
    from buddy.cli import main

    args = ["generate", "--model", str(tiny_ckpt), "--planner", "random", "--dtype", "float32",
            "--max-new-tokens", "1", "--trace", str(tmp_path / "t.jsonl")]
    for flag, v in zip(("--budget", "--layers"), inp):
        if v is not None:
            args += [flag, _text(v)]
    if inp[0] is not None and inp[1] is not None:  # argparse itself refuses both flags (exit 2)
        with pytest.raises(SystemExit) as e:
            main(args + ["w1 w2"])
        assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
        return
    rc = main(args + ["w1 w2"])
    if isinstance(expected, int):
        assert rc == 0
        row = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])
        assert row["k"] == expected and len(row["executed_layers"]) == expected
    else:
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and expected in err[0], err


@pytest.mark.parametrize("inp,expected", TABLE, ids=[str(x[0]) for x in TABLE])
def test_lm_eval_model_args(tiny_ckpt, inp, expected):
    pytest.importorskip("lm_eval")
    from buddy.harness import BuddyLM

    # lm-eval passes model_args as text: `budget=0.5` or `layers=4`
    kw = {n: _text(v) for n, v in zip(("budget", "layers"), inp) if v is not None}
    expect(expected, lambda: BuddyLM(model=str(tiny_ckpt), planner="random", device="cpu", dtype="float32", **kw).k)


def test_lm_eval_generate_until_gives_each_request_its_own_stop_and_length(tiny_ckpt):
    """lm-eval's generate_until requests decode together; each keeps its own until strings and max_gen_toks,
    and its text is the prompt's greedy generation alone."""
    pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from buddy.harness import BuddyLM

    lm = BuddyLM(model=str(tiny_ckpt), planner="random", layers=4, device="cpu", dtype="float32", contexts_per_batch=2)
    prompts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10 w11"]
    alone = ["".join(s.text for s in lm.engine.generate(p, layers=4, max_new_tokens=n)) for p, n in zip(prompts, (6, 3, 6, 3))]
    until = [[], ["w999"], [alone[2].split()[1]] if len(alone[2].split()) > 1 else [], "w999"]
    reqs = [SimpleNamespace(args=(p, {"until": u, "max_gen_toks": n})) for p, u, n in zip(prompts, until, (6, 3, 6, 3))]
    out = lm.generate_until(reqs, disable_tqdm=True)
    assert out[0] == alone[0] and out[1] == alone[1] and out[3] == alone[3]
    assert out[2] == (alone[2].split(until[2][0])[0] if until[2] else alone[2])
    assert lm.layers_per_token == 4 and lm.tokens > 0


def test_echo_names_are_the_same_everywhere():
    assert budget_echo(request_budget(0.5), 3) == {"budget": 0.5, "layers": None, "k": 3}
    assert budget_echo(request_budget(layers=4), 4) == {"budget": None, "layers": 4, "k": 4}
    assert budget_echo("auto", 5) == {"budget": "auto", "layers": None, "k": 5}
