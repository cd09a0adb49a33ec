"""envs.py against independent references: gym-sokoban 0.0.6 (dynamics, shaped reward), brute-force search
(solver), hand-worked trajectories (facts), a stand-in AppWorld world (adapter)."""
import ast
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import types

import numpy as np
import pytest

import envs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTION_ID = {"Up": 1, "Down": 2, "Left": 3, "Right": 4}  # gym-sokoban's push actions


def _gym_sokoban_env():
    """gym-sokoban's SokobanEnv class. Its package imports pkg_resources, which recent setuptools no longer
    ships; a two-line shim (only resource_filename is used) stands in when it is missing."""
    try:
        import pkg_resources  # noqa: F401
    except ModuleNotFoundError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda pkg, res: os.path.join(
            os.path.dirname(importlib.util.find_spec(pkg).origin), res)
        sys.modules["pkg_resources"] = shim
    from gym_sokoban.envs.sokoban_env import SokobanEnv
    return SokobanEnv


def _load_into_gym(SokobanEnv, fixed, state):
    """The same level in gym-sokoban, set up exactly as its reset() leaves it (without generating)."""
    g = SokobanEnv(dim_room=fixed.shape, num_boxes=int(np.isin(state, (3, 4)).sum()), max_steps=10**6, reset=False)
    g.room_fixed, g.room_state = fixed.copy(), state.copy()
    g.player_position = np.argwhere(state == 5)[0]
    g.num_env_steps, g.reward_last, g.boxes_on_target = 0, 0, 0
    g.render = lambda *a, **k: None  # skip the RGB rendering; dynamics and reward are untouched
    return g


def _room(rows):
    """Hand-made room from text (the env's own symbols) -> (room_fixed, room_state)."""
    code = {"#": (0, 0), "_": (1, 1), "O": (2, 2), "X": (1, 4), "√": (2, 3), "P": (1, 5), "S": (2, 5)}
    cells = [[code[ch] for ch in row] for row in rows]
    return np.array([[f for f, _ in r] for r in cells]), np.array([[s for _, s in r] for r in cells])


HAND_ROOMS = [  # boxes starting on targets, spare targets, two boxes in a line: gym-sokoban's edge cases
    ["#######", "#_____#", "#P√X_O#", "#__O__#", "#######"],
    ["######", "#O___#", "#_XX_#", "#_SO_#", "######"],
    ["#######", "#√_X__#", "#_P_O_#", "#__X_O#", "#######"],
]


def _levels():
    levels = [envs.generate_room(s) for s in range(150)]
    levels += [envs.generate_room(s, (7, 7), 2) for s in range(10_000, 10_045)]
    levels += [_room(r) for r in HAND_ROOMS] * 2
    return levels  # 201


def test_dynamics_and_shaped_reward_match_gym_sokoban():
    SokobanEnv = _gym_sokoban_env()
    rng = random.Random(0)
    counts = {"steps": 0, "moved_box": 0, "on": 0, "off": 0, "finished": 0}
    for fixed, state in _levels():
        ours = envs.Sokoban(dim=fixed.shape, max_turns=30, max_actions_per_turn=1, reward="shaped")
        ours.reset(room=(fixed, state))
        g = _load_into_gym(SokobanEnv, fixed, state)
        for _ in range(30):
            name = rng.choice(envs.ACTION_NAMES)
            _, g_reward, g_done, g_info = g.step(ACTION_ID[name])
            _, reward, done, info = ours.step(f"<action>{name}</action>")
            assert np.array_equal(ours.room_state, g.room_state)
            assert reward == g_reward and info["action_rewards"] == [g_reward]  # exact, to the last digit
            assert info["moved"] == [g_info["action.moved_player"]]
            assert info["success"] == g_done == g._check_if_all_boxes_on_target()  # gym: done = solved here
            assert done == (g_done or info["turn"] == 30)
            counts["steps"] += 1
            counts["moved_box"] += g_info["action.moved_box"]
            counts["on"] += 0.85 < g_reward < 0.95 or g_reward > 10
            counts["off"] += g_reward < -1
            counts["finished"] += g_reward > 9
            if done:
                break
    # the comparison exercised every reward branch
    assert counts["steps"] > 4000 and min(counts.values()) > 0, counts


def test_completion_reward_and_multi_action_turns():
    fixed, state = _room(["#######", "#_____#", "#P_X_O#", "#_____#", "#######"])
    env = envs.Sokoban(dim=fixed.shape, max_turns=4)
    env.reset(room=(fixed, state))
    assert env.step("<action>Right</action>")[1:3] == (0.0, False)
    obs, r, done, info = env.step("nonsense")
    assert (r, done, info["invalid"]) == (0.0, False, True)
    obs, r, done, info = env.step("<action>Right || Right || Left</action>")  # solved after 2: Left skipped
    assert (r, done, info["success"], info["completion"], info["actions"]) == (1.0, True, True, 1.0, 3)
    assert "Solved" in obs
    # shaped: the turn reward is the sum of the per-move rewards; an invalid turn costs the format penalty
    env = envs.Sokoban(dim=fixed.shape, max_turns=2, reward="shaped")
    env.reset(room=(fixed, state))
    assert env.step("Jump")[1] == -0.1
    _, r, done, info = env.step("<action>Up || Down || Left</action>")
    assert r == sum(info["action_rewards"]) and len(info["action_rewards"]) == 3 and done
    # more moves than allowed: the extra ones are ignored, not fatal
    env = envs.Sokoban(dim=fixed.shape, max_actions_per_turn=2)
    env.reset(room=(fixed, state))
    _, _, _, info = env.step("Up || Down || Up || Down")
    assert info["actions"] == 2 and info["ignored_actions"] == 2 and not info["invalid"]
    with pytest.raises(RuntimeError, match="reset"):
        done_env = envs.Sokoban(dim=fixed.shape, max_turns=1)
        done_env.reset(room=(fixed, state))
        done_env.step("Up")
        done_env.step("Up")


def test_parse_actions():
    cases = {
        "<action>Up</action>": ["Up"], "up || LEFT": ["Up", "Left"], "<answer>Down</answer>": ["Down"],
        "<think>go right</think><action>Right || up</action>": ["Right", "Up"], "<action>Left": ["Left"],
        "<ACTION> down||down </ACTION> trailing": ["Down", "Down"], "Up, Left.": ["Up", "Left"],
        "<action>Jump</action>": None, "": None, "<action></action>": None, "I go Up": None, None: None,
        "<action>Up</action><action>Left</action>": ["Up"],
    }
    for text, want in cases.items():
        assert envs.parse_actions(text) == want, text


@pytest.mark.slow
def test_fuzzed_responses_never_raise_and_invalid_is_a_noop():
    fixed, state = envs.generate_room(7)
    env = envs.Sokoban()
    env.reset(room=(fixed, state))
    rng = random.Random(1)
    pieces = ["Up", "down", "LEFT", "right", "||", "|", " ", "\n", "<action>", "</action>", "<answer>", "</answer>",
              "<think>", "</think>", "jump", "Upp", "√", "\x00", "<action", "action>", "None", "0", "-", "🙂", ".",
              "up up", "</", "<", ">", "||||", "\\", "'", '"']
    n_valid = n_invalid = 0
    for i in range(10_000):
        kind = i % 4
        if kind == 0:  # random printable / unicode soup
            text = "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(0, 40)))
        elif kind == 1:  # adversarial mixtures of the format's own pieces
            text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 12)))
        elif kind == 2:  # well-formed answers: the parse must be exact
            names = [rng.choice(envs.ACTION_NAMES) for _ in range(rng.randrange(1, 5))]
            sep = rng.choice([" || ", "||", " | ", ", "])
            text = f"<action>{sep.join(rng.choice([n, n.lower(), n.upper()]) for n in names)}</action>"
            assert envs.parse_actions(text) == names
        else:  # huge or degenerate strings
            text = rng.choice(["<action>" * 500, "|" * 5000, "Up " * 3000, "<action>Up" + "x" * 9000, "\n" * 100])
        before_state, before_player = env.room_state.copy(), env.player
        obs, reward, done, info = env.step(text)
        assert isinstance(obs, str) and set(info) >= {"success", "completion", "invalid", "actions"}
        if info["invalid"]:
            n_invalid += 1
            assert np.array_equal(env.room_state, before_state) and env.player == before_player
            assert info["moved"] == [] and reward == env.format_penalty or done
        else:
            n_valid += 1
            assert len(info["moved"]) <= env.max_actions_per_turn
        if done:
            env.reset(room=(fixed, state))
    assert n_valid > 2000 and n_invalid > 4000
    assert not envs.Sokoban().reset(room=(fixed, state)) is None
    env.reset(room=(fixed, state))
    assert env.step(b"<action>Up</action>")[3]["invalid"]  # not a str: invalid, not an exception


def _brute_force_length(fixed, state, max_len):
    """Shortest solution length by iterative deepening over ALL action sequences (no state dedup), with its
    own tiny simulator; None if none up to max_len."""
    H, W = fixed.shape
    walls = {(r, c) for r in range(H) for c in range(W) if fixed[r, c] == 0}
    targets = {(r, c) for r in range(H) for c in range(W) if fixed[r, c] == 2}
    p0 = tuple(np.argwhere(state == 5)[0])
    b0 = frozenset(map(tuple, np.argwhere((state == 3) | (state == 4))))

    def dfs(p, boxes, depth):
        if targets <= boxes:
            return True
        if depth == 0:
            return False
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            q = (p[0] + dr, p[1] + dc)
            nb = boxes
            if q in walls:
                continue
            if q in boxes:
                b = (q[0] + dr, q[1] + dc)
                if b in walls or b in boxes:
                    continue
                nb = boxes - {q} | {b}
            if dfs(q, nb, depth - 1):
                return True
        return False

    for L in range(max_len + 1):
        if dfs(p0, b0, L):
            return L
    return None


@pytest.mark.slow
def test_solve_is_shortest_vs_brute_force():
    checked = 0
    for seed in range(200):
        dim, nb = [((5, 5), 1), ((6, 6), 1), ((6, 6), 2)][seed % 3]
        fixed, state = envs.generate_room(seed, dim, nb, search_depth=12)
        path = envs.solve(fixed, state)
        assert path is not None
        if len(path) > 7:
            continue
        assert _brute_force_length(fixed, state, 7) == len(path)
        env = envs.Sokoban(dim=dim, max_turns=len(path) or 1, max_actions_per_turn=1)
        env.reset(room=(fixed, state))
        for name in path:  # the returned path really solves the level
            info = env.step(name)[3]
        assert info["success"]
        if len(path) > 0:
            assert envs.solve(fixed, state, max_depth=len(path) - 1) is None
        checked += 1
    assert checked >= 60
    # an unsolvable room: the box sits in a corner off the target
    fixed, state = _room(["######", "#X___#", "#__P_#", "#___O#", "######"])
    assert envs.solve(fixed, state) is None and _brute_force_length(fixed, state, 6) is None


def test_task_sets_solvable_disjoint_and_within_budget():
    train, ev = envs.task_set("train"), envs.task_set("eval")
    assert len(train) == 256 and len(ev) == 128 and not set(train) & set(ev)
    assert not set(envs.task_set("train", 1000)) & set(envs.task_set("eval", 1000))
    env = envs.Sokoban()
    budget = env.max_turns * env.max_actions_per_turn
    for seed in train + ev:
        path = envs.solve(*envs.generate_room(seed))
        assert path is not None and 1 <= len(path) <= budget, seed
    with pytest.raises(ValueError, match="train"):
        envs.task_set("test")


# sha256 of the paper setting's rendered rooms, in set order ("\n\n" after each): pinned, so no change to the
# generator or the lists can move the levels silently
PAPER_DIGESTS = {"train": "254b789cecd1fa9051c39fdd9b9c06ce3df7ca942f8e058c8ca34ffd57744576",
                 "eval": "fcc2d02eb2634a3b8b5aff56a2c6c27e200a78469a3ddc5fb2bfbb633cb9c9cc"}


def test_paper_task_sets_fixed_solvable_and_ordered_by_difficulty():
    """Recompute both pinned lists from their rule with the solver, replay each solution through the env in
    4-move turns (the dynamics are checked against gym-sokoban above) and pin digests of the rooms (~2 s)."""
    env = envs.make_env("sokoban-paper")
    assert (env.dim, env.num_boxes, env.max_turns * env.max_actions_per_turn) == ((6, 6), 2, 40)
    lengths = {}
    for name, first, size in (("train", 0, 96), ("eval", 1_000_000, 64)):
        seeds, h = envs.task_set(name, env="sokoban-paper"), hashlib.sha256()
        assert len(seeds) == len(set(seeds)) == size
        ok = {}  # the rule: the first `size` seeds of the split's range solvable within 40 moves
        for s in range(first, first + 10 * size):
            path = envs.solve(*envs.generate_room(s, (6, 6), 2), max_depth=40)
            if path is not None:
                ok[s] = path
            if len(ok) == size:
                break
        want = sorted(ok, key=lambda s: (len(ok[s]), s)) if name == "train" else list(ok)
        assert seeds == want
        for s in seeds:
            env.reset(s)
            h.update((envs.render(env.room_fixed, env.room_state) + "\n\n").encode())
            plan = ok[s]
            for i in range(0, len(plan), 4):
                _, _, done, info = env.step("<action>" + " || ".join(plan[i:i + 4]) + "</action>")
            assert info["success"] and info["completion"] == 1.0 and int((env.room_state == 3).sum()) == 2
        assert h.hexdigest() == PAPER_DIGESTS[name], name
        lengths[name] = [len(ok[s]) for s in seeds]
    assert lengths["train"] == sorted(lengths["train"]) and lengths["train"][0] < lengths["train"][-1]
    assert not set(envs.task_set("train", env="sokoban-paper")) & set(envs.task_set("eval", env="sokoban-paper"))
    assert envs.task_set("train", 10, env="sokoban-paper") == envs.task_set("train", env="sokoban-paper")[:10]
    assert envs.task_set("train", env="sokoban-8x8-2") == envs.task_set("train")  # other envs: seed ranges
    with pytest.raises(ValueError, match="1..96"):
        envs.task_set("train", 97, env="sokoban-paper")


def test_curriculum_schedule():
    # hand-computed: 96 tasks, 180 steps, start 1/4, full at step 90
    assert [envs.curriculum(96, s, 180) for s in (0, 1, 45, 89, 90, 179)] == [24, 25, 60, 96, 96, 96]
    assert envs.curriculum(10, 0, 100, start=0.25) == 3  # ceil(2.5)
    assert envs.curriculum(10, 0, 100, start=0.01) == 1  # never empty
    ks = [envs.curriculum(96, s, 180, start=0.1, full_at=0.8) for s in range(180)]
    assert ks == sorted(ks) and ks[-1] == 96 and ks[0] == 10
    assert {envs.curriculum(96, s, 180, start=1.0) for s in range(180)} == {96}  # off
    assert envs.curriculum(96, 0, 180, full_at=0.0) == 96 and envs.curriculum(96, 0, 0) == 96
    for bad in [(0, 0, 10), (10, -1, 10), (10, 0, 10, 0.0), (10, 0, 10, 0.5, 1.5)]:
        with pytest.raises(ValueError, match="curriculum needs"):
            envs.curriculum(*bad)


@pytest.mark.slow
def test_8x8_two_box_levels_solvable():
    env = envs.make_env("sokoban-8x8-2")
    for seed in envs.task_set("eval", 24):
        env.reset(seed)
        assert env.room_state.shape == (8, 8) and int((env.room_state == 4).sum()) == 2
        path = envs.solve(env.room_fixed, env.room_state, max_depth=200)
        assert path is not None and len(path) <= env.max_turns * env.max_actions_per_turn


_DIGEST = ("import hashlib, envs\n"
           "h = hashlib.sha256()\n"
           "for s in envs.task_set('eval', 64) + envs.task_set('train', 64):\n"
           "    for a in envs.generate_room(s): h.update(a.astype('int64').tobytes())\n"
           "for s in range(8):\n"
           "    for a in envs.generate_room(s, (8, 8), 2): h.update(a.astype('int64').tobytes())\n"
           "print(h.hexdigest())\n")


@pytest.mark.slow
def test_generation_deterministic_across_processes():
    digests = []
    for hashseed in ("0", "12345"):  # different hash seeds: set/dict order must not leak into levels
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        out = subprocess.run([sys.executable, "-c", _DIGEST], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True)
        digests.append(out.stdout.strip())
    scope = {}
    exec(_DIGEST.replace("print(h.hexdigest())", "digest = h.hexdigest()"), scope)
    assert digests[0] == digests[1] == scope["digest"]
    assert not np.array_equal(envs.generate_room(1)[1], envs.generate_room(2)[1])


def test_facts_on_hand_made_trajectories():
    fixed, state = _room(["#######", "#_____#", "#P_X_O#", "#_____#", "#######"])
    env = envs.Sokoban(dim=fixed.shape)
    env.reset(room=(fixed, state))
    for text in ["<action>Up || Up || Down</action>", "hello", "<action>Right || Right || Right</action>"]:
        env.step(text)
    facts = envs.sokoban_facts(json.loads(json.dumps(env.history)))  # JSON round trip: plain data only
    assert set(facts) == {"success", "completion", "num_boxes", "turns", "actions", "moved", "boxes_placed",
                          "boxes_removed", "wall_bumps", "invalid_turns", "dead_corner_pushes",
                          "repeated_states", "loop_free_actions"}
    assert facts == {"success": True, "completion": 1.0, "num_boxes": 1, "turns": 3,
                     "actions": ["Up", "Up", "Down", "Right", "Right", "Right"],
                     "moved": [True, False, True, True, True, True], "boxes_placed": [5], "boxes_removed": [],
                     "wall_bumps": 1, "invalid_turns": 1, "dead_corner_pushes": [], "repeated_states": 1,
                     "loop_free_actions": ["Right", "Right", "Right"]}

    # a box pushed off its target, then into a non-target corner
    fixed, state = _room(["######", "#____#", "#P√__#", "#____#", "######"])
    env = envs.Sokoban(dim=fixed.shape, max_turns=2)
    env.reset(room=(fixed, state))
    env.step("Right || Right || Up")
    env.step("Right || Down")
    facts = envs.sokoban_facts(env.history)
    assert (facts["boxes_removed"], facts["dead_corner_pushes"], facts["boxes_placed"]) == ([0], [4], [])
    assert (facts["success"], facts["completion"], facts["wall_bumps"], facts["repeated_states"]) == (False, 0.0, 0, 0)
    assert facts["loop_free_actions"] == ["Right", "Right", "Up", "Right", "Down"]

    # back-and-forth: every return to an earlier state is counted and the cycles are cut
    fixed, state = _room(["######", "#____#", "#_P__#", "#X__O#", "######"])
    env = envs.Sokoban(dim=fixed.shape, max_turns=2)
    env.reset(room=(fixed, state))
    env.step("Left || Right || Left")
    env.step("Right || Up")
    facts = envs.sokoban_facts(env.history)
    assert facts["repeated_states"] == 3 and facts["loop_free_actions"] == ["Up"] and facts["wall_bumps"] == 0
    assert envs.sokoban_facts([])["turns"] == 0


def test_room_validation_and_make_env():
    fixed, state = _room(["#####", "#P_X_", "#__O#", "#####"])
    with pytest.raises(ValueError, match="enclosed"):
        envs.Sokoban().reset(room=(fixed, state))
    with pytest.raises(ValueError, match="seed"):
        envs.Sokoban().reset()
    with pytest.raises(ValueError, match="sokoban-8x8-2"):
        envs.make_env("sokobn")
    env = envs.make_env("sokoban", reward="shaped")
    obs = env.reset(3)
    assert env.reward == "shaped" and env.room_state.shape == (6, 6) and envs.LEGEND in obs
    assert envs.render(env.room_fixed, env.room_state) in obs
    assert "<action>" in env.task_prompt() and env.task_prompt() == envs.make_env("sokoban").task_prompt()


def test_envs_imports_only_numpy_and_stdlib():
    tree = ast.parse(open(os.path.join(ROOT, "envs.py")).read())
    top = {n.names[0].name.split(".")[0] for n in tree.body if isinstance(n, ast.Import)}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert top <= {"math", "random", "re", "numpy"}, top
    out = subprocess.run([sys.executable, "-c", "import sys, envs; print('torch' in sys.modules)"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- AppWorld adapter against a stand-in world with appworld's API -------------------------------------------

class FakeWorld:
    """Mimics appworld.AppWorld: .task.instruction/.supervisor, execute(code) -> str, task_completed(),
    evaluate().to_dict() with passes / failures / num_tests / success, close()."""
    def __init__(self, task_id, num_tests=4):
        self.task = types.SimpleNamespace(instruction=f"Do task {task_id}.",
                                          supervisor={"first_name": "Ada", "email": "ada@x.org", "id": 7})
        self.codes, self.completed, self.closed, self.num_tests = [], False, False, num_tests

    def execute(self, code):
        if "boom" in code:
            raise RuntimeError("shell crashed")
        self.codes.append(code)
        self.completed |= "complete_task" in code
        return f"ran {len(self.codes)}"

    def task_completed(self):
        return self.completed

    def evaluate(self):
        passed = min(len(self.codes), self.num_tests)
        d = {"success": passed == self.num_tests, "num_tests": self.num_tests, "difficulty": 1,
             "passes": [{"requirement": i} for i in range(passed)],
             "failures": [{"requirement": i} for i in range(passed, self.num_tests)]}
        return types.SimpleNamespace(to_dict=lambda: d)

    def close(self):
        self.closed = True


def test_appworld_adapter_with_stand_in():
    worlds = []
    factory = lambda task_id: worlds.append(FakeWorld(task_id)) or worlds[-1]
    env = envs.make_env("appworld", world_factory=factory, task_ids=["a_1", "b_2"], max_turns=3)
    obs = env.reset(1)
    assert "Do task b_2." in obs and "Ada" in obs and "complete_task" in env.task_prompt()
    obs, r, done, info = env.step("Let me look.")  # no code block: invalid, nothing executed
    assert (r, done, info["invalid"], worlds[-1].codes) == (0.0, False, True, [])
    obs, r, done, info = env.step("First:\n```python\nprint(apis.api_docs.show_app_descriptions())\n```")
    assert worlds[-1].codes == ["print(apis.api_docs.show_app_descriptions())"] and obs.endswith("ran 1")
    assert (r, done, info["invalid"], info["actions"]) == (0.0, False, False, 1)
    obs, r, done, info = env.step("```python\napis.supervisor.complete_task(answer=None)\n```")
    assert done and r == 0.5 and info["completion"] == 0.5 and not info["success"] and worlds[-1].closed
    # a full pass, and the turn limit ends an unfinished episode with its partial score
    worlds.clear()
    env.reset("a_1")
    worlds[-1].num_tests = 2
    env.step("```py\nx = 1\n```")
    _, r, done, info = env.step("```python\napis.supervisor.complete_task(answer=3)\n```")
    assert done and r == 1.0 and info["success"]
    env.reset(0)
    for text in ["```python\nboom()\n```", "nothing", "```python\ny = 2\n```"]:
        obs, r, done, info = env.step(text)
    assert "Execution failed" in env.history[0]["output"] and done and r == 0.25 and not info["success"]
    assert json.loads(json.dumps(env.history))[2]["code"] == "y = 2"


def test_appworld_missing_package_gives_clear_error():
    if importlib.util.find_spec("appworld") is not None:
        pytest.skip("appworld is installed here")
    with pytest.raises(RuntimeError, match="pip install appworld"):
        envs.make_env("appworld")


def test_lenient_parse_reads_move_words_only_when_strict_fails():
    cases = [("You only press the up arrow, then LEFT.", ["Up", "Left"]),
             ("The action is #down.", ["Down"]),
             ("<action>Right || Up</action> then left", ["Right", "Up"]),  # the strict reading wins
             ("upward leftovers", None),  # whole words only
             ("no moves here", None)]
    for text, want in cases:
        assert envs.parse_actions(text, lenient=True) == want, text
    assert envs.parse_actions("press the up arrow") is None  # strict by default
    env = envs.make_env("sokoban", parse="lenient")
    env.reset(envs.task_set("train", 1)[0])
    _, _, _, info = env.step("I would go up")
    assert not info["invalid"] and info["actions"] == 1
    with pytest.raises(ValueError):
        envs.make_env("sokoban", parse="loose")
