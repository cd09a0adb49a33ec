"""Text environments for agentic RL: Sokoban as the LLM-agent field runs it, and an AppWorld adapter.

Every env has the same small interface (what rollout.py and eval.py rely on):
    env.task_prompt() -> str                         # rules + output format, the same for every task of the env
    env.reset(seed) -> str                           # first observation
    env.step(text) -> (obs, reward, done, info)      # info: success, completion, invalid, actions
    env.history                                      # per-turn plain dicts (JSON-serialisable)

Deliberate simplifications and choices:
- generate_room follows gym-sokoban 0.0.6's algorithm (random-walk topology, boxes start on their targets,
  depth-first reverse play with pulls, up to 300,000 explored states, score = box swaps x total displacement),
  with two of its quirks kept so levels are distributed like the field's: its recursion passes the parent's
  `last_pull` on (every pull counts as a "box swap"), and explored states are keyed by the room grid only (a
  state first reached deep is never re-expanded from a shallower path). Every random number comes from ONE
  `random.Random(seed)` through `.random()`, the one stream Python keeps across versions, so a seed gives the
  same level on any machine. A rejected attempt retries with the same generator: every seed yields a level.
- search_depth defaults to 30 (verl-agent's), not gym-sokoban's hard-wired 300: shorter puzzles, which suit
  small models, generated in milliseconds.
- The shaped reward replicates gym-sokoban's float operations in order, including its reset value
  boxes_on_target = 0 (a replayed room starting with a box on a target earns +1 on its first step).
- Defaults for the 135M CPU main job: 6x6, 1 box, 5 turns, up to 3 moves per turn; extra moves are ignored
  (info["ignored_actions"]); once solved, the rest of the turn is skipped.
- An unparsable turn is a no-op that still counts. format_penalty defaults to -0.1 with reward="shaped" and to
  0.0 with reward="completion" (completion steps return 0 until the done step).
- "sokoban-paper" is the paper's setting as a second-hand reading guide gives it (6x6, 2 boxes, 96 training and
  64 test levels, at most 40 moves, curriculum) on our generator: its levels need 2 to 18 moves and are not
  necessarily the paper's. The curriculum schedule is ours.
- The AppWorld adapter has NOT been run against real AppWorld (its data cannot be downloaded here); it is
  written against the appworld 0.1.x API and tested with a stand-in world object.
"""
import math
import random
import re

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Level generation (gym-sokoban's algorithm, one seeded generator)

WALL, FLOOR, TARGET, BOX_ON_TARGET, BOX, PLAYER = 0, 1, 2, 3, 4, 5  # gym-sokoban's cell codes
ACTION_NAMES = ("Up", "Down", "Left", "Right")
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # gym-sokoban's CHANGE_COORDINATES, same order
WALK_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # gym-sokoban's random-walk directions, same order
# the five 3x3 floor stamps of the random walk, row by row ("000 111 000": a horizontal bar)
MASKS = [np.array([[int(ch) for ch in row] for row in m.split()])
         for m in ("000 111 000", "010 010 010", "000 110 010", "000 110 110", "000 011 010")]


def _randbelow(rng, n):
    # uniform int in [0, n) from .random() only: the one stream Python promises to keep across versions
    return min(int(rng.random() * n), n - 1)


def _topology(rng, dim, num_steps, p_change=0.35):
    H, W = dim
    level = np.zeros(dim, dtype=np.int64)
    direction = WALK_DIRS[_randbelow(rng, 4)]
    r, c = 1 + _randbelow(rng, H - 1), 1 + _randbelow(rng, W - 1)  # may start on the border, clamped below
    for _ in range(num_steps):
        if rng.random() < p_change:
            direction = WALK_DIRS[_randbelow(rng, 4)]
        r = min(max(r + direction[0], 1), H - 2)
        c = min(max(c + direction[1], 1), W - 2)
        level[r - 1:r + 2, c - 1:c + 2] += MASKS[_randbelow(rng, 5)]
    level = (level > 0).astype(np.int64)
    level[[0, -1], :] = WALL
    level[:, [0, -1]] = WALL
    return level


def _grid(fixed):  # flat cell indices: the row width, a wall flag per cell, the four moves as index offsets
    W = fixed.shape[1]
    return W, (fixed.ravel() == WALL).tolist(), [dr * W + dc for dr, dc in MOVES]


def _reverse_play(fixed, player, targets, search_depth, max_states=300_000):
    """Depth-first reverse play from the solved state (player walks, and may pull an adjacent box).
    Flat cell indices. Returns (best_score, player, boxes) where boxes[i] is the box that started on targets[i].
    Iterative, but visits states in exactly the recursive pre-order of gym-sokoban's depth_first_search."""
    W, wall, offsets = _grid(fixed)
    explored, best = set(), (-1, player, tuple(targets))
    stack = [(player, tuple(targets), (False,) * len(targets), 0, search_depth)]  # (player, boxes, pulled, swaps, ttl)
    while stack:
        p, boxes, pulled, swaps, ttl = stack.pop()
        ttl -= 1
        if ttl <= 0 or len(explored) >= max_states:
            continue
        # gym-sokoban hashes the grid: a never-pulled box (code 4) differs from a pulled one (code 3)
        key = (p, frozenset(zip(boxes, pulled)))
        if key in explored:
            continue
        explored.add(key)
        covered = set(targets) & (set(boxes) | {p})  # a target under a box or the player: score 0
        score = 0 if covered else swaps * sum(abs(b // W - t // W) + abs(b % W - t % W) for b, t in zip(boxes, targets))
        if score > best[0]:
            best = (score, p, boxes)
        children = []
        for action in range(8):  # 0-3 pull up/down/left/right, 4-7 move: gym-sokoban's order
            d = offsets[action % 4]
            q = p + d
            if wall[q] or q in boxes:
                continue  # gym-sokoban recurses into the unchanged (already explored) state: a no-op
            nb, npl, ns = boxes, pulled, swaps
            if action < 4 and (p - d) in boxes:
                i = boxes.index(p - d)
                nb = boxes[:i] + (p,) + boxes[i + 1:]
                npl = pulled[:i] + (True,) + pulled[i + 1:]
                ns = swaps + 1  # gym-sokoban's effective box_swaps: one per pull
            children.append((q, nb, npl, ns, ttl))
        stack.extend(reversed(children))
    return best


def generate_room(seed, dim=(6, 6), num_boxes=1, search_depth=30, num_steps=None, max_attempts=1000):
    """A solvable level -> (room_fixed, room_state), int64 arrays of shape dim. Same seed, same level."""
    H, W = dim
    if H < 4 or W < 4 or num_boxes < 1 or search_depth < 2:
        raise ValueError(f"generate_room needs dim >= (4, 4), num_boxes >= 1, search_depth >= 2; "
                         f"got dim={dim}, num_boxes={num_boxes}, search_depth={search_depth}")
    rng = random.Random(int(seed))
    num_steps = int(1.7 * (H + W)) if num_steps is None else num_steps
    for _ in range(max_attempts):
        level = _topology(rng, dim, num_steps)
        floor = np.flatnonzero(level.ravel() == FLOOR).tolist()  # row-major, like np.where
        if len(floor) <= num_boxes + 1:
            continue
        player = floor.pop(_randbelow(rng, len(floor)))
        targets = [floor.pop(_randbelow(rng, len(floor))) for _ in range(num_boxes)]
        room_fixed = level.copy()
        room_fixed.flat[targets] = TARGET
        score, p, boxes = _reverse_play(room_fixed, player, targets, search_depth)
        if score > 0:
            room_state = room_fixed.copy()
            room_state.flat[list(boxes)] = BOX  # score > 0 means no box sits on a target
            room_state.flat[p] = PLAYER
            return room_fixed, room_state
    raise RuntimeError(f"generate_room: no level with score > 0 in {max_attempts} attempts for dim={dim}, "
                       f"num_boxes={num_boxes}; use a larger room or fewer boxes")


# ----------------------------------------------------------------------------------------------------------
# Solver (for tests and for reporting optimal lengths; never shown to the agent)

def solve(room_fixed, room_state, max_depth=100, max_states=2_000_000):
    """Breadth-first search -> a shortest list of action names solving the room, or None (none within max_depth)."""
    fixed, state = np.asarray(room_fixed), np.asarray(room_state)
    W, wall, offsets = _grid(fixed)
    targets = frozenset(np.flatnonzero(fixed.ravel() == TARGET).tolist())
    start = (int(np.flatnonzero(state.ravel() == PLAYER)[0]),
             frozenset(np.flatnonzero(np.isin(state.ravel(), (BOX, BOX_ON_TARGET))).tolist()))
    if targets <= start[1]:
        return []
    parent, frontier = {start: None}, [start]
    for _ in range(max_depth):
        nxt = []
        for s in frontier:
            p, boxes = s
            for a, d in enumerate(offsets):
                q = p + d
                if wall[q]:
                    continue
                nb = boxes
                if q in boxes:
                    if wall[q + d] or (q + d) in boxes:
                        continue
                    nb = (boxes - {q}) | {q + d}
                ns = (q, nb)
                if ns in parent:
                    continue
                parent[ns] = (s, a)
                if targets <= nb:
                    path = []
                    while parent[ns] is not None:
                        ns, a = parent[ns]
                        path.append(ACTION_NAMES[a])
                    return path[::-1]
                nxt.append(ns)
        frontier = nxt
        if not frontier or len(parent) > max_states:
            return None
    return None


# ----------------------------------------------------------------------------------------------------------
# Text I/O

SYMBOLS = {WALL: "#", FLOOR: "_", TARGET: "O", BOX_ON_TARGET: "√", BOX: "X", PLAYER: "P"}
LEGEND = "Legend: # wall, _ floor, O target, X box, √ box on target, P you, S you on a target."
FORMAT_EXAMPLE = "<action>Left || Up</action>"
_TAG = re.compile(r"<(action|answer)>(.*?)(?:</\1>|$)", re.S | re.I)
_SEP = re.compile(r"[\s|,;]+")
_NAMES = {n.lower(): n for n in ACTION_NAMES}
_WORD = re.compile(r"\b(up|down|left|right)\b", re.I)


def render(room_fixed, room_state):
    return "\n".join("".join("S" if s == PLAYER and f == TARGET else SYMBOLS[s] for f, s in zip(fr, sr))
                     for fr, sr in zip(np.asarray(room_fixed).tolist(), np.asarray(room_state).tolist()))


def parse_actions(text, lenient=False):
    """'<action>Up || left</action>' (or <answer>, or bare 'Up || Left') -> ['Up', 'Left']; None if any word
    is not a move or there is none. The first tag wins; a missing closing tag is tolerated.
    lenient=True (for very small models that cannot keep the format): when the strict reading fails, the move
    words found anywhere in the text, in order ("press the up arrow, then left" -> ['Up', 'Left'])."""
    if not isinstance(text, str):
        return None
    m = _TAG.search(text)
    body = m.group(2) if m else text
    names = [_NAMES.get(w.strip(".!:'\"`*()[]").lower()) for w in _SEP.split(body) if w]
    if names and None not in names:
        return names
    return ([_NAMES[w.lower()] for w in _WORD.findall(text)] or None) if lenient else None


# ----------------------------------------------------------------------------------------------------------
# Sokoban

class Sokoban:
    STEP_PENALTY, BOX_ON, BOX_OFF, FINISHED = -0.1, 1, -1, 10  # gym-sokoban's constants (same types)

    def __init__(self, dim=(6, 6), num_boxes=1, max_turns=5, max_actions_per_turn=3, reward="completion",
                 search_depth=30, format_penalty=None, parse="strict"):
        if reward not in ("completion", "shaped") or parse not in ("strict", "lenient") or max_turns < 1 \
                or max_actions_per_turn < 1:
            raise ValueError(f"need reward 'completion' or 'shaped', parse 'strict' or 'lenient', max_turns >= 1 "
                             f"and max_actions_per_turn >= 1; got {reward=}, {parse=}, {max_turns=}, "
                             f"{max_actions_per_turn=}")
        self.lenient = parse == "lenient"
        self.dim, self.num_boxes, self.search_depth = tuple(dim), num_boxes, search_depth
        self.max_turns, self.max_actions_per_turn, self.reward = max_turns, max_actions_per_turn, reward
        self.format_penalty = (-0.1 if reward == "shaped" else 0.0) if format_penalty is None else format_penalty
        self.room_fixed = self.room_state = None
        self.history = []

    def task_prompt(self):
        n = self.max_actions_per_turn
        moves = "one move" if n == 1 else f"1 to {n} moves"
        return ("You are playing Sokoban on a grid. You are the player P. Push every box X onto a target O.\n"
                "Rules: each move goes one cell Up, Down, Left or Right (Up is toward the first line). Walking into "
                "a box pushes it one cell the same way if the cell behind it is floor or a target. You cannot pull "
                "boxes, push two boxes at once, or go through walls. A box pushed into a corner is stuck for good.\n"
                f"Symbols: # wall, _ floor, O target, X box, √ box on a target, P you, S you on a target.\n"
                f"You have {self.max_turns} turns. Each turn, answer with {moves} inside <action></action>"
                + (", separated by ||, like " + FORMAT_EXAMPLE if n > 1 else ", like <action>Left</action>") + ".")

    def reset(self, seed=None, room=None):
        if room is not None:
            fixed, state = (np.array(x, dtype=np.int64) for x in room)
            _check_room(fixed, state)
        else:
            if seed is None:
                raise ValueError("reset needs a seed (an int) or room=(room_fixed, room_state)")
            fixed, state = generate_room(seed, self.dim, self.num_boxes, self.search_depth)
        self.seed, self.room_fixed, self.room_state = seed, fixed, state
        self.num_boxes_room = int(np.isin(state, (BOX, BOX_ON_TARGET)).sum())
        self.player = tuple(int(x) for x in np.argwhere(state == PLAYER)[0])
        self.boxes_on_target = 0  # gym-sokoban's reset value (see module docstring)
        self.turn, self.num_actions, self.done, self.history = 0, 0, False, []
        return f"Turn 1 of {self.max_turns}. Current map:\n{render(fixed, state)}\n{LEGEND}"

    def _act(self, a):
        """One move, gym-sokoban's push action (push a box in the way, else walk) -> (moved, shaped reward)."""
        (dr, dc), (r, c) = MOVES[a], self.player
        s, f = self.room_state, self.room_fixed
        nr, nc, br, bc = r + dr, c + dc, r + 2 * dr, c + 2 * dc
        push = s[nr, nc] in (BOX, BOX_ON_TARGET) and s[br, bc] in (FLOOR, TARGET)
        moved = push or s[nr, nc] in (FLOOR, TARGET)
        if push:
            s[br, bc] = BOX_ON_TARGET if f[br, bc] == TARGET else BOX
        if moved:
            s[nr, nc], s[r, c] = PLAYER, f[r, c]
            self.player = (nr, nc)
        # reward: same operations in the same order as gym-sokoban's _calc_reward
        reward = self.STEP_PENALTY
        uncovered = int((s == TARGET).sum()) + int(f[self.player] == TARGET)
        on_target = self.num_boxes_room - uncovered
        if on_target > self.boxes_on_target:
            reward += self.BOX_ON
        elif on_target < self.boxes_on_target:
            reward += self.BOX_OFF
        if uncovered == 0:
            reward += self.FINISHED
        self.boxes_on_target = on_target
        return moved, reward

    def _snapshot(self):
        boxes = np.argwhere(np.isin(self.room_state, (BOX, BOX_ON_TARGET))).tolist()
        return {"player": list(self.player), "boxes": boxes}

    def step(self, text):
        if self.room_state is None or self.done:
            raise RuntimeError("the episode is done: call reset()" if self.done else "call reset() before step()")
        self.turn += 1
        names = parse_actions(text, self.lenient)
        start = self._snapshot()
        moved, rewards, states, ignored = [], [], [], 0
        if names is not None:
            ignored = max(0, len(names) - self.max_actions_per_turn)
            names = names[:self.max_actions_per_turn]
            for name in names:
                m, r = self._act(ACTION_NAMES.index(name))
                moved.append(m), rewards.append(r), states.append(self._snapshot())
                if self.success:
                    break  # solved: the rest of the turn is skipped
            names = names[:len(moved)]  # the moves made
            self.num_actions += len(names)
        invalid = names is None
        success, completion = self.success, self.completion
        self.done = success or self.turn >= self.max_turns
        reward = sum(rewards, 0.0) if self.reward == "shaped" else (completion if self.done else 0.0)
        if invalid:
            reward += self.format_penalty
        self.history.append({
            "turn": self.turn, "response": text if isinstance(text, str) else repr(text), "invalid": invalid,
            "actions": names or [], "moved": moved, "rewards": rewards, "reward": reward, "start": start,
            "states": states, "room_fixed": self.room_fixed.tolist(), "num_boxes": self.num_boxes_room,
            "success": success, "completion": completion, "done": self.done})
        head = (f"Invalid answer, nothing moved. Answer like {FORMAT_EXAMPLE}." if invalid else
                "You moved: " + ", ".join(n if m else f"{n} (blocked)" for n, m in zip(names, moved)) + ".")
        if success:
            head += " Solved! Every box is on a target."
        elif self.done:
            head += " Out of turns."
        else:
            head += f"\nTurn {self.turn + 1} of {self.max_turns}. Current map:"
        obs = f"{head}\n{render(self.room_fixed, self.room_state)}\n{LEGEND}"
        info = {"success": success, "completion": completion, "invalid": invalid, "actions": self.num_actions,
                "turn": self.turn, "moved": moved, "action_rewards": rewards, "ignored_actions": ignored}
        return obs, reward, self.done, info

    @property
    def success(self):  # gym-sokoban's test: no target left uncovered (a player on a target uncovers it)
        return not bool(((self.room_state == TARGET) | ((self.room_fixed == TARGET) & (self.room_state == PLAYER))).any())

    @property
    def completion(self):
        return float((self.room_state == BOX_ON_TARGET).sum()) / max(self.num_boxes_room, 1)


def _check_room(fixed, state):
    if fixed.ndim != 2 or fixed.shape != state.shape or min(fixed.shape) < 3:
        raise ValueError(f"room must be two 2-D arrays of one shape (>= 3x3), got {fixed.shape} and {state.shape}")
    if not (np.isin(fixed, (WALL, FLOOR, TARGET)).all() and np.isin(state, range(6)).all()):
        raise ValueError("room_fixed uses codes 0 wall, 1 floor, 2 target; room_state codes 0..5")
    if int((state == PLAYER).sum()) != 1 or not np.isin(state, (BOX, BOX_ON_TARGET)).any():
        raise ValueError("room_state needs exactly one player (5) and at least one box (3 or 4)")
    border = np.concatenate([fixed[0], fixed[-1], fixed[:, 0], fixed[:, -1]])
    if (border != WALL).any() or ((fixed == WALL) != (state == WALL)).any():
        raise ValueError("the room must be enclosed by walls, and walls must agree between room_fixed and room_state")


# ----------------------------------------------------------------------------------------------------------
# Task sets and facts for skills

TASK_SETS = {"train": (0, 256), "eval": (1_000_000, 128)}  # name -> (first seed, default size); ranges of 1e6
                                                           # seeds each, disjoint
# The paper's Sokoban setting (PAPER.md section 5): fixed sets of 96 training and 64 test levels, every one
# solvable within the 40-move budget. Training levels are seeds 0..95 ordered by optimal length (envs.solve,
# moves), ties by seed, so a curriculum can serve a prefix; test levels are seeds 1_000_000..1_000_063 in seed
# order (so --eval-n 16 is a plain subset, not the easiest 16). Pinned here so no run pays for the solver;
# tests/test_envs.py recomputes both lists and pins digests of the rendered rooms.
FIXED_SETS = {"sokoban-paper": {
    "train": [23, 48, 53, 62, 67, 90, 57, 1, 4, 21, 37, 46, 50, 52, 55, 58, 61, 68, 6, 42, 45, 65, 83, 95, 3, 8, 10,
              11, 20, 31, 33, 34, 35, 78, 82, 94, 7, 17, 22, 28, 29, 39, 40, 41, 43, 49, 51, 54, 63, 64, 72, 73, 84,
              86, 13, 14, 15, 16, 18, 38, 71, 74, 80, 93, 12, 30, 47, 81, 89, 5, 26, 27, 60, 88, 0, 32, 44, 76, 85,
              92, 9, 56, 70, 77, 87, 91, 19, 25, 66, 75, 79, 2, 36, 24, 59, 69],
    "eval": list(range(1_000_000, 1_000_064))}}


def task_set(name, n=None, env="sokoban"):
    """Fixed seeds of a named split of an env: 'train' (revisited during training) or 'eval'. Envs in FIXED_SETS
    have fixed lists (n <= their size, default all; the first n of the list); the others seed ranges ('train'
    256 by default, 'eval' 128; n up to 1e6)."""
    if name not in TASK_SETS:
        raise ValueError(f"unknown task set {name!r}; known: {sorted(TASK_SETS)}")
    fixed = FIXED_SETS.get(env, {}).get(name)
    first, default = TASK_SETS[name]
    limit = len(fixed) if fixed else 1_000_000
    n = (len(fixed) if fixed else default) if n is None else int(n)
    if not 1 <= n <= limit:
        raise ValueError(f"n must be in 1..{limit} for the {name} set of {env}, got {n}")
    return fixed[:n] if fixed else list(range(first, first + n))


def curriculum(n_tasks, step, steps, start=0.25, full_at=0.5):
    """How many of the easiest tasks (a prefix of a difficulty-ordered set) are eligible at 0-based `step` of a
    `steps`-step run: ceil(start * n_tasks) at step 0, growing linearly to all of them at step full_at * steps,
    all from then on. start=1 switches it off. Why these defaults: the paper names a curriculum but not its
    schedule; a quarter of the set to begin with keeps early groups learnable, and the whole second half of the
    run sees every level, so the final model is not trained mostly on easy ones."""
    if n_tasks < 1 or step < 0 or steps < 0 or not (0 < start <= 1 and 0 <= full_at <= 1):
        raise ValueError(f"curriculum needs n_tasks >= 1, step >= 0, steps >= 0, 0 < start <= 1, 0 <= full_at <= 1;"
                         f" got {n_tasks}, {step}, {steps}, {start}, {full_at}")
    ramp = full_at * steps
    frac = 1.0 if step >= ramp else start + (1 - start) * step / ramp
    return min(n_tasks, max(1, math.ceil(round(frac * n_tasks, 9))))  # round: 0.25 * 96 must stay 24


def _is_corner(fixed, r, c):
    wall = lambda i, j: fixed[i][j] == WALL
    return (wall(r - 1, c) or wall(r + 1, c)) and (wall(r, c - 1) or wall(r, c + 1))


def sokoban_facts(history):
    """Plain facts about a finished episode, from env.history only (no solver)."""
    facts = {"success": False, "completion": 0.0, "num_boxes": 0, "turns": len(history), "actions": [],
             "moved": [], "boxes_placed": [], "boxes_removed": [], "wall_bumps": 0, "invalid_turns": 0,
             "dead_corner_pushes": [], "repeated_states": 0, "loop_free_actions": []}
    if not history:
        return facts
    facts.update(success=bool(history[-1]["success"]), completion=float(history[-1]["completion"]),
                 num_boxes=int(history[-1]["num_boxes"]))
    fixed = history[0]["room_fixed"]
    key = lambda st: (tuple(st["player"]), frozenset(map(tuple, st["boxes"])))
    seen = {key(history[0]["start"])}
    path_states, path_actions = [key(history[0]["start"])], []  # the loop-free path so far
    for rec in history:
        if rec["invalid"]:
            facts["invalid_turns"] += 1
            continue
        prev = key(rec["start"])
        for name, moved, st in zip(rec["actions"], rec["moved"], rec["states"]):
            i, cur = len(facts["actions"]), key(st)
            facts["actions"].append(name)
            facts["moved"].append(bool(moved))
            if not moved:
                facts["wall_bumps"] += 1
                continue
            came, went = cur[1] - prev[1], prev[1] - cur[1]
            if came:  # a push: exactly one box moved
                (sr, sc), (dr, dc) = next(iter(went)), next(iter(came))
                on_src, on_dst = fixed[sr][sc] == TARGET, fixed[dr][dc] == TARGET
                if on_dst and not on_src:
                    facts["boxes_placed"].append(i)
                if on_src and not on_dst:
                    facts["boxes_removed"].append(i)
                if not on_dst and _is_corner(fixed, dr, dc):
                    facts["dead_corner_pushes"].append(i)
            facts["repeated_states"] += int(cur in seen)
            seen.add(cur)
            if cur in path_states:  # back to an earlier state: drop the cycle
                j = path_states.index(cur)
                del path_states[j + 1:], path_actions[j:]
            else:
                path_states.append(cur)
                path_actions.append(name)
            prev = cur
    facts["loop_free_actions"] = path_actions
    return facts


# ----------------------------------------------------------------------------------------------------------
# AppWorld adapter (optional; see the module docstring)

APPWORLD_INSTALL = ("pip install appworld && appworld install && appworld download data (in a separate "
                    "virtualenv: appworld's pins conflict with the core stack; set APPWORLD_ROOT to the folder "
                    "holding data/)")
_CODE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S | re.I)


class AppWorld:
    """AppWorld tasks with the Sokoban interface. reset(seed) picks task_ids[seed % len] (or a task id string);
    each turn's last ```python``` block runs in AppWorld's shell; the episode ends when the agent calls
    apis.supervisor.complete_task(...) or after max_turns turns; the done step's reward is the fraction of the
    task's tests passed, success = all passed. world_factory(task_id) -> world lets tests inject a stand-in."""

    def __init__(self, split="train", max_turns=10, experiment_name="skill-sd", task_ids=None,
                 world_factory=None, max_output_chars=3000, format_penalty=0.0):
        if world_factory is None:
            try:
                import appworld
            except ImportError as e:
                raise RuntimeError(f"the AppWorld env needs the optional appworld package and its data: "
                                   f"{APPWORLD_INSTALL}") from e
            if task_ids is None:
                try:
                    task_ids = appworld.load_task_ids(split)
                except Exception as e:
                    raise RuntimeError(f"appworld is installed but its task data was not found ({e}); "
                                       f"run: {APPWORLD_INSTALL}") from e
            world_factory = lambda task_id: appworld.AppWorld(task_id=task_id, experiment_name=experiment_name)
        if not task_ids:
            raise ValueError("AppWorld needs a non-empty task_ids list when world_factory is given")
        self.task_ids, self.world_factory = list(task_ids), world_factory
        self.max_turns, self.max_output_chars, self.format_penalty = max_turns, max_output_chars, format_penalty
        self.world, self.history = None, []

    def task_prompt(self):
        return ("You act for a user (your supervisor) in AppWorld, a world of apps (spotify, gmail, venmo, ...). "
                "Each turn, write Python code in one ```python ... ``` block; it runs in a persistent shell where "
                "apps are called as apis.<app>.<api>(...). Print what you need to see. Find APIs with "
                "apis.api_docs.show_app_descriptions(), apis.api_docs.show_api_descriptions(app_name=...) and "
                "apis.api_docs.show_api_doc(app_name=..., api_name=...). When done, call "
                "apis.supervisor.complete_task(answer=...) (answer=None if the task asks for no answer). "
                f"You have {self.max_turns} turns.")

    def reset(self, seed, room=None):
        self.close()
        self.task_id = seed if isinstance(seed, str) else self.task_ids[int(seed) % len(self.task_ids)]
        self.world = self.world_factory(self.task_id)
        self.turn, self.num_actions, self.done, self.history = 0, 0, False, []
        task = self.world.task
        sup = getattr(task, "supervisor", None)
        if isinstance(sup, dict):
            sup = ", ".join(f"{k}: {v}" for k, v in sup.items() if k in ("first_name", "last_name", "email", "phone_number"))
        return f"Task: {task.instruction}" + (f"\nSupervisor: {sup}" if sup else "")

    def step(self, text):
        if self.world is None or self.done:
            raise RuntimeError("call reset() before step() (and after an episode is done)")
        self.turn += 1
        blocks = _CODE.findall(text) if isinstance(text, str) else []
        code = blocks[-1].strip() if blocks else ""
        invalid = not code
        if invalid:
            output = "No code found. Write Python code inside one ```python ... ``` block."
        else:
            self.num_actions += 1
            try:
                output = str(self.world.execute(code))
            except Exception as e:  # a crashing shell must not kill the rollout
                output = f"Execution failed: {type(e).__name__}: {e}"
        self.done = bool(self.world.task_completed()) or self.turn >= self.max_turns
        success, completion = False, 0.0
        if self.done:
            ev = self.world.evaluate().to_dict()
            passes = len(ev.get("passes", []))
            num_tests = ev.get("num_tests") or passes + len(ev.get("failures", []))
            success, completion = bool(ev.get("success", False)), passes / num_tests if num_tests else 0.0
            self.close()
        reward = (completion if self.done else 0.0) + (self.format_penalty if invalid else 0.0)
        if len(output) > self.max_output_chars:
            output = output[:self.max_output_chars] + "\n...[output truncated]"
        self.history.append({"turn": self.turn, "response": text if isinstance(text, str) else repr(text),
                             "invalid": invalid, "code": code, "output": output, "success": success,
                             "completion": completion, "done": self.done})
        info = {"success": success, "completion": completion, "invalid": invalid, "actions": self.num_actions,
                "turn": self.turn}
        return f"Output:\n{output}", reward, self.done, info

    def close(self):
        if self.world is not None and hasattr(self.world, "close"):
            self.world.close()
        self.world = None


# ----------------------------------------------------------------------------------------------------------

# 8x8 / 2-box levels need up to ~20 moves (vs <= 11 for 6x6 / 1 box), hence more turns by default.
# sokoban-paper: the paper's 6x6 / 2 boxes with at most 40 moves per episode, as 10 turns x 4 moves: the cap holds
# by construction (a turn's extra moves are ignored), the optimal solutions (2..18 moves) fit 2x over, and 10
# observations keep an episode's context small (40 turns x 1 move would repeat the map 40 times). Its task sets
# are fixed (FIXED_SETS). Completion reward: Acc = solved, Comp = boxes on targets.
ENVS = {"sokoban": dict(dim=(6, 6), num_boxes=1),
        "sokoban-8x8-2": dict(dim=(8, 8), num_boxes=2, max_turns=8),
        "sokoban-paper": dict(dim=(6, 6), num_boxes=2, max_turns=10, max_actions_per_turn=4)}


def make_env(name, **kw):
    """make_env('sokoban' | 'sokoban-8x8-2' | 'sokoban-paper' | 'appworld', **overrides) -> a fresh env."""
    if name == "appworld":
        return AppWorld(**kw)
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; known: {sorted(ENVS) + ['appworld']}")
    return Sokoban(**{**ENVS[name], **kw})
