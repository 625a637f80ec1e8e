"""`adore generate` run as a user runs it (subprocesses): JSON output, text on stdout and timing on stderr,
streaming of every prompt, --version, defaults in --help, one-line errors with exit code 2, and the
persistent compilation cache."""
import json
import os
import subprocess
import sys

import pytest

from test_user_generate import save_tiny_chat_model

PROMPTS = ["Hello there", "Write: 🐉🔥 你好"]


def adore(*args, env=None, cwd=None):
    environment = {**os.environ, "ADORE_JAX_NO_COMPILE_CACHE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "adore_jax.cli", *args], capture_output=True, text=True,
                          env=environment, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat_cli"))


@pytest.fixture(scope="module")
def json_run(model_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("compile_cache")
    args = ["generate", "--model", model_dir, "--max-new-tokens", "20", "-n", "2", "--json", "--logprobs",
            *[a for p in PROMPTS for a in ("--prompt", p)]]
    done = adore(*args, env={"ADORE_JAX_NO_COMPILE_CACHE": "", "ADORE_JAX_COMPILE_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done, cache


def test_json_output_holds_texts_ids_finish_reasons_and_stats(json_run):
    result, done, _ = json_run
    outputs = result["outputs"]
    assert [(o["prompt_index"], o["sample"]) for o in outputs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for output in outputs:
        assert output["prompt"] == PROMPTS[output["prompt_index"]]
        assert output["finish_reason"] in ("eos", "stop", "length")
        assert len(output["logprobs"]) == len(output["token_ids"]) > 0
        assert isinstance(output["text"], str)
    assert outputs[0]["text"] == outputs[1]["text"]  # greedy: both samples alike
    assert result["stats"]["batch"] == 4 and result["stats"]["samples_per_prompt"] == 2
    assert "[timing]" not in done.stdout + done.stderr


def test_the_cli_fills_the_persistent_compile_cache(json_run):
    *_, cache = json_run
    assert any(os.scandir(cache)), "no compiled program was written to the compilation cache"


def test_plain_output_is_the_text_and_timing_goes_to_stderr(json_run, model_dir):
    text = json_run[0]["outputs"][0]["text"]
    done = adore("generate", "--model", model_dir, "--max-new-tokens", "20", "--prompt", PROMPTS[0])
    assert done.returncode == 0, done.stderr
    assert done.stdout == text + "\n"
    finish = json_run[0]["outputs"][0]["finish_reason"]
    assert f"[finish] {finish}" in done.stderr and "[timing]" in done.stderr and "tokens/s" in done.stderr


def test_stream_prints_every_prompt_exactly_as_generated(json_run, model_dir):
    """Random bytes from a byte-level model: characters of several bytes are split across decode chunks."""
    texts = [json_run[0]["outputs"][i]["text"] for i in (0, 2)]
    args = ["generate", "--model", model_dir, "--max-new-tokens", "20", "--stream"]
    done = adore(*args, *[a for p in PROMPTS for a in ("--prompt", p)])
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"--- [0] {PROMPTS[0]}\n{texts[0]}\n--- [1] {PROMPTS[1]}\n{texts[1]}\n"


def test_version_and_defaults_in_help():
    import adore_jax.cli

    version = adore("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"adore {adore_jax.cli._version()}"
    assert version.stdout.strip() != "adore unknown (not installed)"
    usage = adore("generate", "--help")
    assert usage.returncode == 0
    flat = " ".join(usage.stdout.split())
    for shown in ("at most (default: 64)", "0 = greedy (default: 0.0)", "(default: smollm2-135m)",
                  "(default: float32)"):
        assert shown in flat, f"{shown!r} not in generate --help"
    assert "(default: None)" not in flat


BAD_VALUES = [  # generate arguments, and what the error line must say
    (["--max-new-tokens", "abc"], "argument --max-new-tokens: invalid int value: 'abc'"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16' (choose from 'float32', 'bfloat16')"),
    (["--temperature", "inf"], "temperature must be a finite number >= 0 (0 = greedy); got inf"),
    (["--top-p", "2"], "top_p must be in (0, 1]; got 2.0"),
    (["-n", "0"], "n (samples per prompt) must be an integer >= 1; got 0"),
    (["--stop-token-id", "259"], "stop_token_ids must be in [0, 259) (the model's vocabulary); got 259"),
    (["--logprobs"], "--logprobs is shown in --json output only; add --json"),
    (["--policy", "window", "--set", "cache_size=sixty"], "config key 'cache_size' must be int; got 'sixty'"),
    (["--policy", "window", "--cache-size", "8", "--sinks", "9"], "sinks + recent (9 + 0) must be <= cache_size (8)"),
    (["--policy", "tova", "--cache-size", "8", "--rebuild", "2"], "Rebuild(ranked_by='scorer') ranks released tokens"),
    (["--preset", "adore_recall", "--set", "returns.r=0"], "r (recalled tokens per step) must be an integer >= 1"),
    (["--config", "configs/eval_cpu.yaml"], "is an evaluation config"),
]


@pytest.mark.parametrize("args, named", BAD_VALUES, ids=[" ".join(args) for args, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_it_and_what_is_allowed(model_dir, args, named):
    done = adore("generate", "--model", model_dir, "--prompt", "hi", *args)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adore generate: error: ") and named in lines[0], done.stderr


def _truncated_gguf(tmp_path):
    from adore_jax import weights

    path = tmp_path / "cut.gguf"
    with open(weights.embedded_model_path("smollm2-135m"), "rb") as f:
        path.write_bytes(f.read(4_000_000))
    return str(path), "truncated"


def _bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    return str(tmp_path), "not valid JSON"


def _config_json_missing_key(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "vocab_size": 10}')
    return str(tmp_path), "required key 'num_attention_heads' is missing"


@pytest.mark.parametrize("make", [_truncated_gguf, _bad_config_json, _config_json_missing_key])
def test_bad_model_files_are_one_line_errors_naming_the_file(tmp_path, make):
    source, reason = make(tmp_path)
    done = adore("generate", "--model", source, "--prompt", "hi")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adore generate: error: "), done.stderr
    assert source in lines[0] and reason in lines[0], lines[0]


def test_an_oversized_cache_is_lowered_with_a_one_line_warning(model_dir):
    done = adore("generate", "--model", model_dir, "--max-new-tokens", "4", "--prompt", "hi", "--policy", "window",
                 "--cache-size", "100000")
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("adore generate: warning: cache_size 100000 is more than"), \
        done.stderr
    assert "[timing] window" in done.stderr


def test_a_bad_value_fails_before_the_model_loads(tmp_path):
    """A range error is found before the (slow) model load: the model named here does not exist."""
    done = adore("generate", "--model", str(tmp_path / "missing.gguf"), "--prompt", "hi", "--max-new-tokens", "0")
    assert done.returncode == 2 and "max_new_tokens must be an integer >= 1; got 0" in done.stderr, done.stderr


def test_no_torch_advisory_on_the_command_line(json_run):
    assert "PyTorch was not found" not in json_run[1].stderr


def test_ctrl_c_stops_cleanly_with_exit_130_keeping_what_was_streamed(model_dir):
    """SIGINT while generating: no traceback, exit status 130, the streamed text kept on stdout."""
    import signal

    environment = {**os.environ, "ADORE_JAX_NO_COMPILE_CACHE": "1"}

    def default_sigint():  # a terminal's foreground job; a runner that ignores SIGINT would pass that on
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen([sys.executable, "-m", "adore_jax.cli", "generate", "--model", model_dir, "--stream",
                                "--max-new-tokens", "240", "--decode-chunk", "1", "-n", "128", "--temperature", "1",
                                "--prompt", PROMPTS[0]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment, preexec_fn=default_sigint)
    label = process.stdout.readline()  # "--- [0] ..." printed before the model loads
    first = process.stdout.read(1)  # the stream has started: 239 more steps of 128 rows, one compiled step each
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert label.startswith("---") and len(first + out) > 0
