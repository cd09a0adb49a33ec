"""Skills: summarise finished episodes into short text, keep them in a UCB bank, show them to the teacher.

A skill is the paper's JSON object with three fields (success_analysis, mistake_analysis, golden_workflow).
Episodes reach this module as plain dicts (no torch, no project imports):
    {"task_id": int | str, "env": "sokoban" | ..., "task": str, "turns": [{"response": str, "observation": str}],
     "reward": float, "success": bool, "facts": dict | None}   # facts = envs.sokoban_facts(env.history)

Deliberate simplifications:
- Backends: "rule" (deterministic, from the facts alone, the offline default), "self" (the policy through a
  complete(prompts) -> texts callable; prompts are plain user-message strings, the caller applies its chat
  template) and "openai:<base_url>" (urllib, one request per episode, sequential within a batch).
- Asynchrony is a thread pool: summarisers spend their time waiting on I/O or on a model that releases the GIL.
- The bank is in-process and per rank; it is saved as one JSON file. Task ids are keyed by str(task_id).
- parse_skill repairs only single quotes and trailing commas; anything else that is not JSON is rejected.
"""
import concurrent.futures
import json
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields

FIELDS = ("success_analysis", "mistake_analysis", "golden_workflow")
MAX_FIELD_CHARS = 4000   # longer fields are a runaway generation, not a skill
MAX_PARSE_CHARS = 100_000
MAX_STARTS = 64          # '{' positions tried per text; bounds the work on adversarial input


@dataclass
class Skill:
    success_analysis: str
    mistake_analysis: str
    golden_workflow: str
    task_id: object = None  # provenance: the task the episode came from (int seed or str)
    reward: float = 0.0     # the summarised episode's reward
    step: int = 0           # training step at which the episode was played
    backend: str = ""
    uid: int = -1           # set by SkillBank.add
    pulls: int = 0          # UCB statistics: number of arm rewards received
    value_sum: float = 0.0  # and their sum

    @property
    def mean(self):
        return self.value_sum / self.pulls if self.pulls else 0.0

    def key(self):
        """Normalised text of the three fields: the de-duplication key."""
        return "\n".join(" ".join(getattr(self, f).lower().split()) for f in FIELDS)


# ----------------------------------------------------------------------------------------------------------
# parsing

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', re.S)
_SPECIAL = re.compile(r'[{}"\']')


def _repair(s):
    """Single-quoted strings -> JSON strings; trailing commas before } or ] removed (outside strings)."""
    out, pos = [], 0
    for m in _STRING.finditer(s):
        out.append(re.sub(r",\s*([}\]])", r"\1", s[pos:m.start()]))
        tok = m.group(0)
        if tok[0] == "'":  # re-encode the body as a JSON string
            tok = json.dumps(tok[1:-1].replace("\\'", "'").replace('\\"', '"'))
        out.append(tok)
        pos = m.end()
    out.append(re.sub(r",\s*([}\]])", r"\1", s[pos:]))
    return "".join(out)


def _span(text, start):
    """End (exclusive) of the balanced {...} starting at text[start], skipping quoted strings; None if unbalanced."""
    depth, i = 0, start
    while (m := _SPECIAL.search(text, i)) is not None:  # jump from one brace or quote to the next
        ch, i = m.group(0), m.start()
        if ch in "\"'":
            m = _STRING.match(text, i)
            if m is None:
                return None
            i = m.end()
            continue
        depth += 1 if ch == "{" else -1
        if depth == 0:
            return i + 1
        i += 1
    return None


def _to_skill(obj):
    if not isinstance(obj, dict) or not all(f in obj for f in FIELDS):
        return None
    vals = []
    for f in FIELDS:
        v = obj[f]
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            v = "\n".join(x.strip() for x in v)  # a workflow given as a list of steps
        if not isinstance(v, str) or len(v) > MAX_FIELD_CHARS:
            return None
        vals.append(v.strip())
    if not vals[2].strip(". "):  # no workflow (or the prompt's "..." echoed back) teaches nothing
        return None
    return Skill(*vals)


def parse_skill(text):
    """The first JSON object in `text` (prose, code fences) holding the three fields -> Skill, else None.

    Tolerates single quotes, trailing commas, extra keys and a golden_workflow given as a list of strings.
    Rejects missing or non-string fields, an empty workflow and fields over MAX_FIELD_CHARS. Never raises.
    """
    try:
        if not isinstance(text, str) or len(text) > MAX_PARSE_CHARS:
            return None
        starts = [m.start() for m in re.finditer(r"\{", text)][:MAX_STARTS]
        for start in starts:
            end = _span(text, start)
            if end is None:
                continue
            chunk = text[start:end]
            for cand in (chunk, _repair(chunk)):
                try:
                    skill = _to_skill(json.loads(cand))
                except ValueError:
                    continue
                if skill is not None:
                    return skill
        return None
    except Exception:  # RecursionError on absurd nesting, anything else: a bad output is just no skill
        return None


# ----------------------------------------------------------------------------------------------------------
# summarisers

def _moves(idx, actions, limit=8):
    """'move 3 (Right), move 5 (Up)': 1-based move numbers, as a human reads the trajectory."""
    s = ", ".join(f"move {i + 1} ({actions[i]})" for i in idx[:limit] if 0 <= i < len(actions))
    return s + (f" and {len(idx) - limit} more" if len(idx) > limit else "")


def _rule_sokoban(f):
    acts, placed = list(f.get("actions", [])), list(f.get("boxes_placed", []))
    nb, turns = f.get("num_boxes", 1), f.get("turns", 0)
    corners, removed = list(f.get("dead_corner_pushes", [])), list(f.get("boxes_removed", []))
    bumps, invalid, loops = f.get("wall_bumps", 0), f.get("invalid_turns", 0), f.get("repeated_states", 0)
    free = list(f.get("loop_free_actions", []))
    if f.get("success"):
        success = f"Solved: all {nb} box(es) on targets after {len(acts)} moves in {turns} turns."
    elif f.get("completion", 0.0) > 0:
        success = f"Partly solved: {f['completion']:.0%} of {nb} boxes on targets at the end ({turns} turns)."
    else:
        success = f"Not solved: no box on a target at the end ({turns} turns, {len(acts)} moves)."
    success += (f" Boxes were pushed onto targets by {_moves(placed, acts)}." if placed
                else " No move pushed a box onto a target.")
    mistakes = []
    if corners:
        mistakes.append(f"{_moves(corners, acts)} pushed a box into a corner that is not a target; a cornered "
                        "box can never be moved again, so the level became unsolvable (deadlock).")
    if removed:
        mistakes.append(f"{_moves(removed, acts)} pushed a box off a target.")
    if bumps:
        hit = [i for i, m in enumerate(f.get("moved", [])) if not m]
        mistakes.append(f"{bumps} move(s) changed nothing (walked into a wall or a blocked box): {_moves(hit, acts)}.")
    if invalid:
        mistakes.append(f"{invalid} turn(s) gave output that could not be parsed as actions; each one wasted a turn.")
    if loops:
        mistakes.append(f"Earlier positions were revisited {loops} time(s): moves that undo each other "
                        "waste the move budget.")
    if not f.get("success") and not mistakes:
        mistakes.append("No single blunder, but the turn budget ran out before all boxes were on targets.")
    mistake = " ".join(mistakes) if mistakes else "None: every move changed the state and no position repeated."
    if f.get("success") and free:
        workflow = (f"Move sequence that solves this level, loops removed ({len(free)} moves): "
                    f"{', '.join(free)}. Send these moves in order, a few per turn, in the required format.")
    else:
        steps = ["Find each box and its target; push a box by standing on the opposite side and moving toward it."]
        if corners:
            steps.append("Never push a box into a corner (or against a wall) unless that cell is a target.")
        if bumps:
            steps.append("Before each move check the next cell: walls do not move, and a box cannot be pushed "
                         "into a wall or another box.")
        if invalid:
            steps.append("Answer every turn in the required action format.")
        if loops:
            steps.append("Do not undo the previous move; every move should bring a box closer to its target.")
        if placed and not f.get("success"):
            steps.append(f"The opening {', '.join(acts[:placed[-1] + 1])} put a box on a target; keep it there.")
        workflow = " ".join(f"{i + 1}. {s}" for i, s in enumerate(steps))
    return success, mistake, workflow


def _rule_generic(ep):
    turns = ep.get("turns") or []
    resp = [str(t.get("response", "")).strip() for t in turns]
    state = "succeeded" if ep.get("success") else "failed"
    success = f"The episode {state} with reward {float(ep.get('reward', 0.0)):g} after {len(turns)} turns."
    empty = sum(1 for r in resp if not r)
    repeats = sum(1 for a, b in zip(resp, resp[1:]) if a and a == b)
    mistakes = ([f"{empty} turn(s) had an empty response."] if empty else []) + \
               ([f"The same response was repeated {repeats} time(s) in a row."] if repeats else [])
    mistake = " ".join(mistakes) or ("None observed." if ep.get("success") else "The task was not completed.")
    if ep.get("success") and resp:
        workflow = " ".join(f"{i + 1}. {r[:200]}" for i, r in enumerate(resp))[:3000]
    else:
        workflow = "No working sequence yet: read each observation, do not repeat a response that changed " \
                   "nothing, and try a different approach to the step that failed."
    return success, mistake, workflow


def rule_skill(ep):
    f = ep.get("facts")
    if str(ep.get("env", "sokoban")).startswith("sokoban") and isinstance(f, dict) and "actions" in f:
        return Skill(*_rule_sokoban(f))
    return Skill(*_rule_generic(ep))


def _safe(fn, ep, stats):
    try:
        return fn(ep)
    except Exception as e:  # odd facts from a new env version: no skill for this episode, counted
        stats["last_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return None


def summary_prompt(ep, max_chars=8000):
    """The user message asking a model to summarise one episode into the skill JSON."""
    lines = [f"Task:\n{str(ep.get('task', ''))[:3000]}", ""]
    for i, t in enumerate(ep.get("turns") or []):
        lines += [f"Turn {i + 1} agent: {str(t.get('response', ''))[:600]}",
                  f"Turn {i + 1} environment: {str(t.get('observation', ''))[:600]}"]
    transcript = "\n".join(lines)
    if len(transcript) > max_chars:  # keep the start (task) and the end (outcome)
        transcript = transcript[:max_chars // 2] + "\n...\n" + transcript[-max_chars // 2:]
    if isinstance(ep.get("facts"), dict):  # measured facts keep a small summariser honest
        transcript += "\n\nFacts measured by the environment: " + json.dumps(ep["facts"])[:1500]
    outcome = "succeeded" if ep.get("success") else "failed"
    return (f"Below is an agent's attempt at a task. It {outcome} with reward {float(ep.get('reward', 0.0)):g}.\n\n"
            f"{transcript}\n\nSummarise the attempt as a reusable skill for a future attempt at the same task. "
            'Reply with only a JSON object with exactly three string fields: "success_analysis" (what worked), '
            '"mistake_analysis" (what went wrong and why), "golden_workflow" (the step-by-step procedure to '
            "follow next time). Keep each field under 120 words. Format:\n"
            '{"success_analysis": "...", "mistake_analysis": "...", "golden_workflow": "..."}')


def _count(stats, k, n=1):
    stats[k] = stats.get(k, 0) + n


def _chat(url, model, prompt, stats, timeout, retries, backoff):
    """One chat completion; returns the text or None (failure counted). The key is read here and only ever
    placed in the request header: never stored, logged or put in stats."""
    body = json.dumps({"model": model, "temperature": 0.0, "max_tokens": 1024,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = "Bearer " + os.environ["OPENAI_API_KEY"]
    for attempt in range(retries + 1):
        if attempt:
            _count(stats, "retries")
            time.sleep(backoff * 2 ** (attempt - 1))
        _count(stats, "requests")
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read().decode("utf-8", "replace"))["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            _count(stats, "http_errors")
            stats["last_error"] = f"HTTP {e.code}"
            e.close()
            if e.code < 500 and e.code != 429:  # a client error will not go away by retrying
                return None
        except OSError as e:  # URLError, connection reset, socket timeout: worth another try
            timed_out = isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)
            _count(stats, "timeouts" if timed_out else "errors")
            stats["last_error"] = type(e).__name__
        except Exception as e:  # malformed response body
            _count(stats, "errors")
            stats["last_error"] = type(e).__name__
            return None
    return None


def check_backend(backend, complete=None, model=None):
    """Raise ValueError for a misconfigured backend (call once at start-up; summarize itself never raises)."""
    if backend == "self" and complete is None:
        raise ValueError('backend "self" needs complete=callable(list[str]) -> list[str]')
    if backend.startswith("openai:"):
        if not backend[7:].startswith(("http://", "https://")):
            raise ValueError(f'expected "openai:http(s)://host:port/v1", got {backend!r}')
        if not (model or os.environ.get("SKILL_SD_SUMMARIZER_MODEL")):
            raise ValueError("openai backend needs a model name (argument or SKILL_SD_SUMMARIZER_MODEL)")
    elif backend not in ("rule", "self"):
        raise ValueError(f'unknown summariser backend {backend!r}; use "rule", "self" or "openai:<base_url>"')


def summarize(episodes, backend="rule", step=0, complete=None, model=None, stats=None,
              timeout=60.0, retries=2, backoff=1.0):
    """Episodes -> skills (one per episode at most; failures are dropped and counted in `stats`). Never raises.

    stats (a dict, updated in place): episodes, skills, dropped, and for LLM backends parse_failures,
    requests, retries, timeouts, http_errors, errors, last_error.
    """
    stats = {} if stats is None else stats
    _count(stats, "episodes", len(episodes))
    try:
        check_backend(backend, complete, model)
        if backend == "rule":
            texts = None
            skills = [_safe(rule_skill, ep, stats) for ep in episodes]
        elif backend == "self":
            texts = list(complete([summary_prompt(ep) for ep in episodes]))
        else:
            base = backend[7:].rstrip("/")
            url = base if base.endswith("/chat/completions") else base + "/chat/completions"
            name = model or os.environ["SKILL_SD_SUMMARIZER_MODEL"]
            texts = [_chat(url, name, summary_prompt(ep), stats, timeout, retries, backoff) for ep in episodes]
        if texts is not None:
            skills = [parse_skill(t) if t is not None else None for t in texts]
            _count(stats, "parse_failures", sum(1 for t, s in zip(texts, skills) if t is not None and s is None))
    except Exception as e:  # a broken backend costs skills, never the training run
        stats["last_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        skills = [None] * len(episodes)
    out = []
    for ep, s in zip(episodes, skills):
        if s is None:
            continue
        s.task_id, s.reward, s.step, s.backend = ep.get("task_id"), float(ep.get("reward", 0.0)), step, \
            backend.split(":")[0]
        out.append(s)
    _count(stats, "skills", len(out))
    _count(stats, "dropped", len(episodes) - len(out))
    return out


class AsyncSummarizer:
    """A small thread pool around summarize(): submit() only enqueues; collect() returns what has finished.

    Accounting (self.stats): submitted / finished / failed count episodes, so that
    submitted == finished + cancelled + episodes still running, and finished - failed == skills produced.
    With backend "self" the complete() callable runs in a worker thread: make it thread-safe, or use sync=True.
    """

    def __init__(self, backend="rule", complete=None, workers=2, sync=False, **kw):
        check_backend(backend, complete, kw.get("model"))
        self.backend, self.complete, self.sync, self.kw = backend, complete, sync, kw
        self.stats = {"submitted": 0, "finished": 0, "failed": 0}
        self.lock = threading.Lock()
        self.pending, self.ready = [], []  # (future, n episodes) in submission order; skills not yet collected
        self.pool = None if sync else concurrent.futures.ThreadPoolExecutor(workers, "skill-summarizer")

    def _job(self, episodes, step):
        local = {}
        skills = summarize(episodes, self.backend, step, self.complete, stats=local, **self.kw)
        with self.lock:
            for k, v in local.items():
                if isinstance(v, (int, float)):
                    _count(self.stats, k, v)
                else:
                    self.stats[k] = v
            self.stats["finished"] += len(episodes)
            self.stats["failed"] += len(episodes) - len(skills)
        return skills

    def submit(self, episodes, step):
        episodes = list(episodes)
        with self.lock:
            self.stats["submitted"] += len(episodes)
        if self.sync:
            self.ready += self._job(episodes, step)
        else:
            self.pending.append((self.pool.submit(self._job, episodes, step), len(episodes)))

    def collect(self, wait=False):
        """Finished skills, in submission order of their batches. wait=True blocks until all are finished."""
        if wait:
            concurrent.futures.wait([f for f, _ in self.pending])
        out, self.ready = self.ready, []
        while self.pending and self.pending[0][0].done():  # keep submission order: stop at the first unfinished
            fut, _ = self.pending.pop(0)
            if not fut.cancelled():
                out += fut.result()
        return out

    def close(self, drain=True):
        """Stop the workers. drain=True finishes queued batches (collect() still returns them);
        drain=False cancels batches that have not started."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=not drain)
            with self.lock:
                self.stats["cancelled"] = sum(n for f, n in self.pending if f.cancelled())


# ----------------------------------------------------------------------------------------------------------
# the bank

class SkillBank:
    """Skills keyed by task, an environment-wide pool as fallback, UCB1 selection.

    Arm reward (what train.py passes to update): for the task group the skill's teacher scored,
        r = mean_i A_i * mean_t (logp_teacher - logp)   over the group's episodes i and their sampled tokens t,
    i.e. whether the skill-conditioned teacher raises the likelihood of above-average episodes and lowers that
    of below-average ones. It costs nothing extra: both log-probs and the advantages already exist.
    UCB1 score = mean arm reward + c * sqrt(ln(total pulls of the candidate arms) / pulls); unpulled arms first,
    ties broken by a fixed seeded order. c is in units of the arm reward (log-prob x advantage, typically 0.01-1).
    Eviction when a task list (or the pool) is full: the pulled arm with the lowest mean arm reward; unpulled
    arms are optimistic (as in UCB) and are evicted only when no arm has been pulled, oldest (step, uid) first.
    De-duplication: a skill whose normalised text equals one already in its task list (pool) is not added there.
    """

    def __init__(self, capacity_per_task=4, global_capacity=64, c=0.5, seed=0):
        if capacity_per_task < 1 or global_capacity < 0:
            raise ValueError("capacity_per_task must be >= 1 and global_capacity >= 0")
        self.capacity_per_task, self.global_capacity, self.c, self.seed = capacity_per_task, global_capacity, c, seed
        self.skills, self.tasks, self.pool = {}, {}, []  # uid -> Skill; str(task_id) -> [uid]; [uid]
        self.next_uid = 0
        self.counters = {"added": 0, "duplicates": 0, "evictions": 0, "selects": 0, "hits": 0, "fallbacks": 0}

    def _evict_one(self, uids):
        def key(u):
            s = self.skills[u]
            return (0, s.mean, s.step, u) if s.pulls else (1, 0.0, s.step, u)
        uids.remove(min(uids, key=key))
        self.counters["evictions"] += 1

    def _insert(self, uids, skill, capacity):
        """Returns 'dup', or whether the skill survived the capacity check."""
        if any(self.skills[u].key() == skill.key() for u in uids):
            return "dup"
        uids.append(skill.uid)
        while len(uids) > capacity:
            self._evict_one(uids)
        return skill.uid in uids

    def add(self, skill):
        """Store a skill (provenance task_id decides its list). Returns True if it was kept anywhere."""
        skill.uid, self.next_uid = self.next_uid, self.next_uid + 1
        self.skills[skill.uid] = skill
        res = [self._insert(self.pool, skill, self.global_capacity)]
        if skill.task_id is not None:
            res.append(self._insert(self.tasks.setdefault(str(skill.task_id), []), skill, self.capacity_per_task))
        kept = True in res
        self.counters["added"] += kept
        self.counters["duplicates"] += "dup" in res
        self._gc()
        return kept

    def _gc(self):
        self.tasks = {k: v for k, v in self.tasks.items() if v}
        live = set(self.pool).union(*self.tasks.values())
        self.skills = {u: s for u, s in self.skills.items() if u in live}

    def _ucb(self, arms):
        total = sum(s.pulls for s in arms)

        def score(s):
            if s.pulls == 0:
                return math.inf
            return s.mean + self.c * math.sqrt(math.log(total) / s.pulls)
        return max(arms, key=lambda s: (score(s), random.Random(self.seed * 1_000_003 + s.uid).random()))

    def select(self, task_id):
        """The top-UCB skill of this task, else of the global pool, else None (no distillation signal)."""
        self.counters["selects"] += 1
        uids = self.tasks.get(str(task_id))
        if uids:
            self.counters["hits"] += 1
        elif self.pool:
            uids = self.pool
            self.counters["fallbacks"] += 1
        else:
            return None
        return self._ucb([self.skills[u] for u in uids])

    def update(self, skill, arm_reward):
        arm_reward = float(arm_reward)
        if not math.isfinite(arm_reward):
            raise ValueError(f"arm reward must be a finite number, got {arm_reward}")
        skill.pulls += 1
        skill.value_sum += arm_reward

    def metrics(self):
        n = max(self.counters["selects"], 1)
        pulls = sum(s.pulls for s in self.skills.values())
        return {"size": len(self.skills), "tasks": len(self.tasks), "pool": len(self.pool),
                "hit_rate": self.counters["hits"] / n, "fallback_rate": self.counters["fallbacks"] / n,
                "mean_arm_reward": sum(s.value_sum for s in self.skills.values()) / pulls if pulls else 0.0,
                **self.counters}

    def state_dict(self):
        return {"version": 1, "capacity_per_task": self.capacity_per_task, "global_capacity": self.global_capacity,
                "c": self.c, "seed": self.seed, "next_uid": self.next_uid, "counters": dict(self.counters),
                "skills": [asdict(s) for s in self.skills.values()],
                "tasks": {k: list(v) for k, v in self.tasks.items()}, "pool": list(self.pool)}

    def save(self, path):
        """Atomic: write a temporary file next to `path`, then os.replace (a crash leaves the old file)."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(self.state_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        try:
            with open(path) as fh:
                d = json.load(fh)
            bank = cls(d["capacity_per_task"], d["global_capacity"], d["c"], d["seed"])
            names = {f.name for f in fields(Skill)}
            bank.skills = {s["uid"]: Skill(**{k: v for k, v in s.items() if k in names}) for s in d["skills"]}
            bank.tasks, bank.pool = {k: list(v) for k, v in d["tasks"].items()}, list(d["pool"])
            bank.next_uid, bank.counters = d["next_uid"], dict(d["counters"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a skill bank saved by SkillBank.save ({type(e).__name__}: {e})")
        return bank


def teacher_prompt(skill, task_prompt):
    """The teacher's system message: the task rules, then the skill in a delimited block. skill=None -> unchanged.

    Example, teacher_prompt(Skill("Solved in 3 moves.", "None.", "Right, Up, Up"), "You are solving Sokoban...")
    returns:
        You are solving Sokoban...

        ### Skill from earlier attempts at this task
        Success analysis: Solved in 3 moves.
        Mistake analysis: None.
        Golden workflow: Right, Up, Up
        ### End of skill
    Only the teacher sees this; the student keeps the plain task prompt.
    """
    if skill is None:
        return task_prompt
    return (f"{task_prompt}\n\n### Skill from earlier attempts at this task\n"
            f"Success analysis: {skill.success_analysis}\nMistake analysis: {skill.mistake_analysis}\n"
            f"Golden workflow: {skill.golden_workflow}\n### End of skill")
