"""hellaswag.py against a brute-force reference on a tiny random GPT-2, plus data checks, CLI and ranks."""

import copy
import dataclasses
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hellaswag
from gpt2_tokenizer import get_encoding, get_tokenizer

REPO = Path(__file__).resolve().parents[1]


def make_example(ind: int, activity_label: str, ctx_a: str, ctx_b: str, endings: list[str], label: int) -> dict:
    """A record shaped like a line of the original hellaswag_val.jsonl."""
    return {
        "ind": ind,
        "activity_label": activity_label,
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        "ctx": f"{ctx_a} {ctx_b}".strip(),
        "split": "val",
        "split_type": "indomain",
        "label": label,
        "endings": endings,
        "source_id": f"test~{ind}",
    }


EXAMPLES = [
    make_example(
        0,
        "Washing dishes",
        "A woman stands at a sink full of plates.",
        "she",
        [
            "turns on the tap.",
            "rinses each plate under hot water and stacks them on the rack to dry in the sun.",
            "sings.",
            "picks up a sponge and scrubs.",
        ],
        2,
    ),
    make_example(  # WikiHow style: bracketed markers, empty ctx_b
        1,
        "Home and Garden",
        "[header] How to repot a plant [title] Choose a bigger pot.",
        "",
        [
            "[step] Pick one that is two inches wider. [substeps] Clay pots breathe.",
            "[step] Water the plant the day before.",
            "[title] Loosen the roots. [step] Tease them apart gently with your fingers so they spread out.",
            "[step] Any pot will do.",
        ],
        1,
    ),
    make_example(
        2,
        "Playing drums",
        "A large crowd gathers in a stadium at night while the lights sweep across the stage, and a band "
        "walks out to loud cheers; the drummer sits down behind a huge kit, adjusts the cymbals, counts in "
        "the song with his sticks and the guitarist steps up to the microphone.",
        "The crowd",
        ["cheers.", "goes silent.", "sings along with every word of the chorus.", "leaves."],
        3,
    ),
    make_example(3, "Running", "A dog runs.", "It", ["barks.", "stops.", "jumps over a fence.", "sleeps."], 0),
    make_example(  # capitalize() lowercases the rest of ctx_b in the harness query
        4,
        "Eating out",
        "A family walks into a restaurant.",
        "At McDonald's they",
        ["order burgers.", "sit by the window and talk.", "leave.", "pay."],
        1,
    ),
]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # a wide initialisation spreads the logits, so the endings' scores are far apart and the
    # float32 evaluator and the float64 reference pick the same ending
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50257, n_positions=256, initializer_range=1.0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "hellaswag_small.jsonl", EXAMPLES)


# -----------------------------------------------------------------------------
# the brute-force reference: tiktoken, one unpadded float64 forward pass per ending


def reference_tokens(example: dict, style: str) -> tuple[list[int], list[list[int]], list[int]]:
    """Context tokens, ending tokens and acc_norm divisors, tokenized with tiktoken."""
    enc = get_encoding()
    if style == "completion":
        endings = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
        return enc.encode_ordinary(example["ctx"]), endings, [len(ending) for ending in endings]
    ctx = example["ctx_a"] + " " + example["ctx_b"].capitalize()
    query = hellaswag.harness_preprocess(example["activity_label"] + ": " + ctx)
    choices = [hellaswag.harness_preprocess(ending) for ending in example["endings"]]
    context = enc.encode_ordinary(query)
    endings = [enc.encode_ordinary(query + " " + choice)[len(context) :] for choice in choices]
    return context, endings, [len(choice) for choice in choices]


def reference_scores(model64, examples: list[dict], style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed ending losses (N, 4) and acc_norm divisors (N, 4), in float64."""
    losses, norm_lengths = [], []
    for example in examples:
        context, endings, norms = reference_tokens(example, style)
        row = []
        for ending in endings:
            ids = torch.tensor([context + ending])
            log_probs = torch.log_softmax(model64(ids).logits[0, :-1], dim=-1)
            token_log_probs = log_probs[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
            row.append(-token_log_probs[-len(ending) :].sum())
        losses.append(torch.stack(row))
        norm_lengths.append(norms)
    return torch.stack(losses), torch.tensor(norm_lengths, dtype=torch.float64)


# -----------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  A man is seen.  ", "A man is seen."),
        ("[header] How to cook rice [title] Rinse it.", " How to cook rice. Rinse it."),
        ("[step] Wash it. [substeps] Dry it.", " Wash it. Dry it."),
        ("Boil [title] water", "Boil. water"),
        ("a    b", "a  b"),  # one pass of replacing double spaces, as in the harness
    ],
)
def test_harness_preprocess(text, expected):
    assert hellaswag.harness_preprocess(text) == expected


@pytest.mark.parametrize(
    "style, index, ending, expected",
    [
        ("completion", 0, 3, "A woman stands at a sink full of plates. she picks up a sponge and scrubs."),
        (
            "harness",
            1,
            0,
            "Home and Garden: How to repot a plant. Choose a bigger pot.  Pick one that is two inches wider. "
            "Clay pots breathe.",
        ),
        ("harness", 4, 3, "Eating out: A family walks into a restaurant. At mcdonald's they pay."),
    ],
)
def test_rendered_text(tokenizer, style, index, ending, expected):
    rendered = hellaswag.render_examples([EXAMPLES[index]], tokenizer, style)[0]
    assert tokenizer.decode(rendered.sequences[ending]) == expected


@pytest.mark.parametrize("style", hellaswag.STYLES)
def test_scores_match_brute_force(model, tokenizer, style):
    expected_losses, norm_lengths = reference_scores(copy.deepcopy(model).double(), EXAMPLES, style)
    rendered = hellaswag.render_examples(EXAMPLES, tokenizer, style)
    for example, rendered_example in zip(EXAMPLES, rendered, strict=True):
        context, endings, norms = reference_tokens(example, style)
        assert rendered_example.sequences == [context + ending for ending in endings]
        assert rendered_example.norm_lengths == norms

    # two padded batches of unequal widths: 3 examples, then 2
    losses = torch.cat([hellaswag.ending_losses(model, rendered[:3]), hellaswag.ending_losses(model, rendered[3:])])
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses.double(), expected_losses, rtol=1e-5, atol=1e-4)

    best = expected_losses.argmin(dim=1)
    best_norm = (expected_losses / norm_lengths).argmin(dim=1)
    labels = torch.tensor([example["label"] for example in EXAMPLES])
    result = hellaswag.evaluate(model, rendered, batch_size=3)
    assert (result.n, result.correct, result.correct_norm) == (5, (best == labels).sum(), (best_norm == labels).sum())
    assert result.acc == result.correct / 5 and result.acc_norm == result.correct_norm / 5

    # per example: relabelled with the reference's choices, every example must count as correct
    def relabel(labels: torch.Tensor) -> list[hellaswag.RenderedExample]:
        return [dataclasses.replace(ex, label=int(label)) for ex, label in zip(rendered, labels, strict=True)]

    assert hellaswag.evaluate(model, relabel(best), batch_size=2).correct == 5
    assert hellaswag.evaluate(model, relabel(best_norm), batch_size=2).correct_norm == 5


def test_evaluate_restores_training_mode(model, tokenizer):
    rendered = hellaswag.render_examples(EXAMPLES[:2], tokenizer)
    model.train()
    hellaswag.evaluate(model, rendered)
    assert model.training
    model.eval()


def test_distributed_shards_sum_to_single_process(model, tokenizer):
    rendered = hellaswag.render_examples(EXAMPLES, tokenizer, "harness")
    single = hellaswag.evaluate(model, rendered, batch_size=2)

    def shard_counts(rank: int) -> torch.Tensor:
        shard = hellaswag.evaluate(model, rendered, batch_size=2, rank=rank, world_size=2, reduce=lambda c: c)
        return torch.tensor([shard.n, shard.correct, shard.correct_norm])

    counts = [shard_counts(0), shard_counts(1)]
    assert [c[0].item() for c in counts] == [3, 2]  # strided: examples 0, 2, 4 and 1, 3
    # all_reduce hands each rank its own counts plus the other rank's
    on_rank_0 = hellaswag.evaluate(model, rendered, batch_size=2, rank=0, world_size=2, reduce=lambda c: c + counts[1])
    on_rank_1 = hellaswag.evaluate(model, rendered, batch_size=2, rank=1, world_size=2, reduce=lambda c: c + counts[0])
    assert on_rank_0 == on_rank_1 == single

    with pytest.raises(RuntimeError, match="process group"):
        hellaswag.evaluate(model, rendered, world_size=2)


def test_every_rank_runs_the_same_number_of_forward_passes(model, tokenizer):
    """A sharded (FSDP) model hangs if one rank stops calling forward before the others."""
    rendered = hellaswag.render_examples(EXAMPLES, tokenizer)  # 5 examples: 3 on rank 0, 2 on rank 1
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        passes = []
        for rank in (0, 1):
            calls.clear()
            hellaswag.evaluate(model, rendered, batch_size=1, rank=rank, world_size=2, reduce=lambda c: c)
            passes.append(len(calls))
    finally:
        hook.remove()
    assert passes == [3, 3]


def test_torchrun_two_processes_match_single_process(model_dir, data_file, tmp_path):
    single_json, dual_json = tmp_path / "single.json", tmp_path / "dual.json"
    args = ["--model", str(model_dir), "--data_file", str(data_file), "--device", "cpu", "--batch_size", "2"]
    assert hellaswag.main([*args, "--output_json", str(single_json)]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [*torchrun, "hellaswag.py", *args, "--output_json", str(dual_json)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("hellaswag completion:") == 1  # rank 1 knew it was not rank 0
    assert json.loads(dual_json.read_text()) == json.loads(single_json.read_text())


# -----------------------------------------------------------------------------
# data


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ('{"ctx": "A man', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({key: value for key, value in EXAMPLES[0].items() if key != "ctx_b"}, "missing field(s) ctx_b"),
        ({**EXAMPLES[0], "ctx": 7}, "'ctx' must be a string"),
        ({**EXAMPLES[0], "endings": ["a", "b", "c"]}, "'endings' must be a list of 4"),
        ({**EXAMPLES[0], "endings": ["a", "b", "c", ""]}, "'endings' must be a list of 4"),
        ({**EXAMPLES[0], "label": 4}, "'label' must be an integer from 0 to 3, got 4"),
        ({**EXAMPLES[0], "label": "1"}, "'label' must be an integer from 0 to 3, got '1'"),
    ],
)
def test_malformed_line_is_reported_with_its_number(tmp_path, bad_line, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [EXAMPLES[0], "", EXAMPLES[1], bad_line, EXAMPLES[2]])
    with pytest.raises(hellaswag.HellaSwagError, match="line 4: ") as error:
        hellaswag.load_examples(path)
    assert problem in str(error.value)


def test_data_file_subset_loads(data_file):
    assert hellaswag.load_examples(data_file) == EXAMPLES


def test_missing_data_file(tmp_path):
    with pytest.raises(hellaswag.HellaSwagError, match="does not exist"):
        hellaswag.load_examples(tmp_path / "nope.jsonl")


def serve(source: Path, monkeypatch) -> None:
    """Downloads read `source`, pinned as the genuine file."""
    monkeypatch.setattr(hellaswag, "DATA_URL", source.as_uri())
    monkeypatch.setattr(hellaswag, "VAL_SHA256", hashlib.sha256(source.read_bytes()).hexdigest())


def test_download_is_cached_once(tmp_path, monkeypatch):
    full_split = [dict(EXAMPLES[i % 5], ind=i) for i in range(hellaswag.VAL_EXAMPLES)]
    source = write_jsonl(tmp_path / "remote.jsonl", full_split)
    monkeypatch.setenv(hellaswag.DATA_DIR_ENV, str(tmp_path / "cache"))
    serve(source, monkeypatch)
    assert hellaswag.load_examples() == full_split
    assert sorted(os.listdir(tmp_path / "cache")) == [hellaswag.VAL_FILE_NAME]

    source.unlink()  # a second load must not touch the network
    assert len(hellaswag.load_examples()) == hellaswag.VAL_EXAMPLES


def test_incomplete_cached_split_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv(hellaswag.DATA_DIR_ENV, str(tmp_path))
    write_jsonl(tmp_path / hellaswag.VAL_FILE_NAME, EXAMPLES)
    with pytest.raises(hellaswag.HellaSwagError, match="has 5 examples, expected 10042: delete it"):
        hellaswag.load_examples()


def test_offline_without_local_copy_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv(hellaswag.DATA_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(hellaswag, "DATA_URL", (tmp_path / "unreachable.jsonl").as_uri())
    with pytest.raises(hellaswag.HellaSwagError) as error:
        hellaswag.load_examples()
    message = str(error.value)
    assert str(tmp_path / "cache" / hellaswag.VAL_FILE_NAME) in message and "--data_file" in message
    assert not (tmp_path / "cache").exists()  # nothing written: neither a partial file nor its folder


def test_a_download_that_is_not_the_pinned_file_is_refused_and_leaves_nothing(tmp_path, data_file, monkeypatch):
    monkeypatch.setenv(hellaswag.DATA_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(hellaswag, "DATA_URL", data_file.as_uri())  # a 5-example file, not the pinned original
    with pytest.raises(hellaswag.HellaSwagError) as error:
        hellaswag.load_examples()
    got = hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert str(error.value).startswith(
        f"downloaded {data_file.as_uri()} has sha256 {got}, expected {hellaswag.VAL_SHA256}; nothing was written."
    )
    assert "\n" not in str(error.value) and not (tmp_path / "cache").exists()


def test_a_download_that_cannot_be_written_is_one_line(tmp_path, data_file, monkeypatch):
    (tmp_path / "file").write_text("a file where the cache folder would go")
    monkeypatch.setenv(hellaswag.DATA_DIR_ENV, str(tmp_path / "file" / "cache"))
    serve(data_file, monkeypatch)
    with pytest.raises(hellaswag.HellaSwagError) as error:
        hellaswag.load_examples()
    assert str(error.value) == (
        f"cannot write {tmp_path / 'file' / 'cache'}: Not a directory; no partial file is left: check the path and "
        f"its filesystem and rerun, or set {hellaswag.DATA_DIR_ENV} to another folder"
    )


# -----------------------------------------------------------------------------
# command line


def test_cli_prints_and_writes_json(model_dir, data_file, tmp_path, capsys):
    output = tmp_path / "out" / "scores.json"
    args = ["--model", str(model_dir), "--data_file", str(data_file), "--style", "harness", "--device", "cpu"]
    assert hellaswag.main([*args, "--limit", "4", "--output_json", str(output)]) == 0
    scores = json.loads(output.read_text())
    assert scores.keys() == {"model", "style", "n", "acc", "acc_norm"}
    assert (scores["model"], scores["style"], scores["n"]) == (str(model_dir), "harness", 4)
    printed = capsys.readouterr().out
    assert f"acc {scores['acc']:.4f} | acc_norm {scores['acc_norm']:.4f} | n 4" in printed


def test_cli_falls_back_to_gpt2_tokenizer(model, model_dir, data_file, tmp_path, capsys):
    bare_dir = tmp_path / "no_tokenizer"
    model.save_pretrained(bare_dir)

    def scores_of(folder: Path) -> tuple:
        output = tmp_path / f"{folder.name}.json"
        argv = ["--model", str(folder), "--data_file", str(data_file), "--output_json", str(output)]
        assert hellaswag.main(argv) == 0
        scores = json.loads(output.read_text())
        return scores["acc"], scores["acc_norm"], scores["n"]

    assert scores_of(bare_dir) == scores_of(model_dir)
    assert "has no tokenizer, using the project's GPT-2 tokenizer" in capsys.readouterr().err


def files_limited_to_32_bytes() -> None:
    """Run in a child before it starts: a write past a file's 32nd byte fails with EFBIG, as one fails with ENOSPC on
    a full disk (SIGXFSZ ignored, or the kernel would kill the child instead). Importing torch writes 4 bytes to find
    a temporary folder; the scores take more."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (32, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_cli_scores_that_cannot_be_written_are_one_line(model_dir, data_file, tmp_path):
    output = tmp_path / "scores.json"
    output.write_text("an earlier run's scores\n")
    argv = ["--model", model_dir, "--data_file", data_file, "--device", "cpu", "--output_json", output]
    result = subprocess.run(
        [sys.executable, str(REPO / "hellaswag.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=files_limited_to_32_bytes,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (  # after the progress bar
        f"error: cannot write {output}: File too large; the scores are printed above: lift the file size limit "
        "(ulimit -f, or the filesystem's own) and rerun, or pass another --output_json"
    )
    assert "hellaswag completion: acc" in result.stdout
    assert sorted(os.listdir(tmp_path)) == sorted([data_file.name, output.name])  # no temporary file left
    assert output.read_text() == "an earlier run's scores\n"  # written to a temporary file, never over it


def test_cli_user_errors_are_one_line(model_dir, data_file, tmp_path, capsys):
    malformed = write_jsonl(tmp_path / "bad.jsonl", [EXAMPLES[0], "{"])
    cases = [
        (model_dir, tmp_path / "nope.jsonl", "does not exist"),
        (model_dir, malformed, "line 2: invalid JSON"),
        (tmp_path / "no_model", data_file, "model folder"),
        ("nobody/no-such-model", data_file, "cannot load model nobody/no-such-model"),
    ]
    for model_path, data_path, expected in cases:
        assert hellaswag.main(["--model", str(model_path), "--data_file", str(data_path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
