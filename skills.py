"""Skills: summarise finished task groups into short text, keep them in a UCB bank, show them to the teacher.

A skill is the paper's JSON object with three fields (success_analysis, mistake_analysis, golden_workflow).
Episodes reach this module as plain dicts (no torch, no project imports), in groups: a group is the G episodes
of one task from one step, and it yields at most one skill (success and failure side by side):
    {"task_id": int | str, "env": "sokoban" | ..., "task": str, "turns": [{"response": str, "observation": str}],
     "reward": float, "success": bool, "facts": dict | None}   # facts = envs.sokoban_facts(env.history)

Deliberate simplifications:
- Backends: "rule" (deterministic, from the facts alone, the offline default), "oracle" (PRIVILEGED: the rule
  analyses with a solver's shortest solution as the workflow; a positive control, never a default), "self" (the
  policy through a complete(prompts) -> texts callable; prompts are plain user-message strings, the caller
  applies its chat template) and "openai:<base_url>" (urllib, one request per group). Structured output is
  negotiated once per summariser (FORMATS, _ask); a refusal is an HTTP error whose body names the format.
- Asynchrony is a few daemon threads: summarisers wait on I/O or on a model that releases the GIL. close()
  abandons requests in flight instead of waiting them out (a daemon thread dies with the process).
- The bank is in-process. Every rank holds an identical copy: the same adds, selects and updates in the same
  order, and selection is deterministic (seeded tie-break). It is saved as one JSON file; task ids are str keys.
- A skill's level-agnostic part (Skill.general) is what the environment-wide pool holds; the rule summariser
  writes it without the level's moves, LLM summaries give their two analyses (move lists scrubbed), no workflow.
- parse_skill repairs only single quotes and trailing commas; anything else that is not JSON is rejected.
"""
import concurrent.futures
import contextlib
import json
import math
import os
import queue
import random
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, fields

FIELDS = ("success_analysis", "mistake_analysis", "golden_workflow")
MAX_FIELD_CHARS = 4000   # longer fields are a runaway generation, not a skill
MAX_PARSE_CHARS = 100_000
MAX_STARTS = 64          # '{' positions tried per text; bounds the work on adversarial input


@dataclass
class Skill:
    success_analysis: str
    mistake_analysis: str
    golden_workflow: str
    task_id: object = None  # provenance: the task the group came from (int seed or str)
    reward: float = 0.0     # the best reward in the summarised group
    step: int = 0           # training step at which the group was submitted (its age = now - step)
    backend: str = ""
    uid: int = -1           # set by SkillBank.add
    pulls: int = 0          # UCB statistics: number of arm rewards received
    value_sum: float = 0.0  # and their sum
    general: list = field(default_factory=list)  # [success, mistake, workflow] with nothing level-specific: the pool's
    scope: str = "task"     # "task": this task's own skill; "pool": a level-agnostic skill from another task

    def key(self):
        """Normalised text of the three fields: the de-duplication key."""
        return "\n".join(" ".join(getattr(self, f).lower().split()) for f in FIELDS)


# ----------------------------------------------------------------------------------------------------------
# parsing

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', re.S)
_TOKEN = re.compile(_STRING.pattern + r"""|[{}"']""", re.S)  # a quoted string, a brace, or a quote left open
_FIXABLE = re.compile(_STRING.pattern + r"|,\s*(?=[}\]])", re.S)  # a quoted string, or a trailing comma


def _repair(s):
    """Single-quoted strings -> JSON strings; trailing commas before } or ] removed (outside strings)."""
    def fix(m):
        tok = m.group(0)
        if tok[0] == "'":  # re-encode the body as a JSON string
            return json.dumps(tok[1:-1].replace("\\'", "'").replace('\\"', '"'))
        return "" if tok[0] == "," else tok
    return _FIXABLE.sub(fix, s)


def _span(text, start):
    """End (exclusive) of the balanced {...} starting at text[start], skipping quoted strings; None if unbalanced."""
    depth = 0
    for m in _TOKEN.finditer(text, start):
        tok = m.group(0)
        if tok in ('"', "'"):  # a quote that no closing quote matches
            return None
        depth += {"{": 1, "}": -1}.get(tok, 0)  # a whole string: 0
        if depth == 0:
            return m.end()
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

    Tolerates single quotes, trailing commas, raw control characters (newlines) inside strings, extra keys and a
    golden_workflow given as a list of strings.
    Rejects missing or non-string fields, an empty workflow and fields over MAX_FIELD_CHARS. Never raises."""
    try:
        if not isinstance(text, str) or len(text) > MAX_PARSE_CHARS:
            return None
        for start in [m.start() for m in re.finditer(r"\{", text)][:MAX_STARTS]:
            end = _span(text, start)  # repair and parse only the balanced {...}: bounded work, nothing after it
            for cand in (text[start:end], _repair(text[start:end])) if end else ():
                try:
                    skill = _to_skill(json.loads(cand, strict=False))  # raw newlines in strings: llama.cpp's grammar
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


# (facts key, what an attempt did): the level-agnostic names of the mistakes sokoban_facts measures
_KINDS = (("dead_corner_pushes", "pushed a box into a corner that is not a target (deadlock: unsolvable after)"),
          ("boxes_removed", "pushed a box off a target"),
          ("wall_bumps", "walked into a wall or a blocked box (the move changed nothing)"),
          ("invalid_turns", "gave a reply that could not be parsed as actions (a wasted turn)"),
          ("repeated_states", "undid earlier moves (wasted move budget)"))


def _lessons(fs):
    """Level-agnostic advice for the mistakes seen in the attempts `fs` (facts dicts): no moves of any level."""
    seen = lambda k: any(f.get(k) for f in fs)  # noqa: E731
    return (["Find each box and its target; push a box by standing on the opposite side and moving toward it."]
            + ["Never push a box into a corner (or against a wall) unless that cell is a target."] * seen("dead_corner_pushes")
            + ["Before each move check the next cell: walls do not move, and a box cannot be pushed into a wall "
               "or another box."] * seen("wall_bumps")
            + ["Answer every turn in the required action format."] * seen("invalid_turns")
            + ["Do not undo the previous move; every move should bring a box closer to its target."] * seen("repeated_states"))


def _numbered(steps):
    return " ".join(f"{i + 1}. {s}" for i, s in enumerate(steps))


def _rule_sokoban(f, fs):
    """(success, mistake, workflow) of one attempt with facts f; the workflow's advice covers all attempts fs."""
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
    hit = [i for i, m in enumerate(f.get("moved", [])) if not m]
    mistakes = [text for seen, text in (
        (corners, f"{_moves(corners, acts)} pushed a box into a corner that is not a target; a cornered box can "
                  "never be moved again, so the level became unsolvable (deadlock)."),
        (removed, f"{_moves(removed, acts)} pushed a box off a target."),
        (bumps, f"{bumps} move(s) changed nothing (walked into a wall or a blocked box): {_moves(hit, acts)}."),
        (invalid, f"{invalid} turn(s) gave output that could not be parsed as actions; each one wasted a turn."),
        (loops, f"Earlier positions were revisited {loops} time(s): moves that undo each other waste the move "
                "budget.")) if seen]
    if not f.get("success") and not mistakes:
        mistakes.append("No single blunder, but the turn budget ran out before all boxes were on targets.")
    mistake = " ".join(mistakes) if mistakes else "None: every move changed the state and no position repeated."
    if f.get("success") and free:
        workflow = (f"Move sequence that solves this level, loops removed ({len(free)} moves): "
                    f"{', '.join(free)}. Send these moves in order, a few per turn, in the required format.")
    else:
        steps = _lessons(fs)
        if placed and not f.get("success"):
            steps.append(f"The opening {', '.join(acts[:placed[-1] + 1])} put a box on a target; keep it there.")
        workflow = _numbered(steps)
    return success, mistake, workflow


def oracle_workflow(solution, per_turn):
    """The privileged golden workflow: a solver's solution in the answer format, turns of at most `per_turn` moves."""
    turns = [solution[i:i + per_turn] for i in range(0, len(solution), per_turn)]
    return (f"Shortest solution from the start, {len(solution)} move{'s' * (len(solution) != 1)}: "
            + ", ".join(f"turn {t + 1}: <action>{' || '.join(m)}</action>" for t, m in enumerate(turns)) + ".")


def oracle_skill(group):
    """PRIVILEGED (an upper bound on skill quality, like a teacher shown the answer; never a default): the rule
    summariser's success and mistake analysis of the group, with oracle_workflow of the episodes' "solution" (the
    solver's move list, which the caller adds to each episode dict with "moves_per_turn") as the golden workflow."""
    sol, per_turn = group[0].get("solution"), group[0].get("moves_per_turn")
    if not sol or not isinstance(per_turn, int):
        raise ValueError("the oracle summariser needs episode dicts with 'solution' and 'moves_per_turn'")
    skill = rule_skill(group)
    skill.golden_workflow = oracle_workflow(list(sol), per_turn)
    return skill


def _rule_generic(ep):
    turns = ep.get("turns") or []
    resp = [str(t.get("response", "")).strip() for t in turns]
    success = (f"The episode {'succeeded' if ep.get('success') else 'failed'} with reward "
               f"{float(ep.get('reward', 0.0)):g} after {len(turns)} turns.")
    empty = sum(1 for r in resp if not r)
    repeats = sum(1 for a, b in zip(resp, resp[1:]) if a and a == b)
    mistakes = ([f"{empty} turn(s) had an empty response."] if empty else []) + \
               ([f"The same response was repeated {repeats} time(s) in a row."] if repeats else [])
    mistake = " ".join(mistakes) or ("None observed." if ep.get("success") else "The task was not completed.")
    workflow = " ".join(f"{i + 1}. {r[:200]}" for i, r in enumerate(resp))[:3000] if ep.get("success") and resp \
        else GENERIC_ADVICE
    return success, mistake, workflow


GENERIC_ADVICE = ("No working sequence yet: read each observation, do not repeat a response that changed nothing, "
                  "and try a different approach to the step that failed.")


def rule_skill(group):
    """One skill from one task group: the best attempt's outcome and workflow (on Sokoban a solved attempt's
    loop-free moves), the mistakes of the other attempts (failed first, up to three distinct ones), and a
    level-agnostic `general` part (mistake kinds counted over the group, advice without this level's moves)."""
    G, rewards = len(group), [float(ep.get("reward", 0.0)) for ep in group]
    solved = [bool(ep.get("success")) for ep in group]
    sokoban = all(str(ep.get("env", "sokoban")).startswith("sokoban") and isinstance(ep.get("facts"), dict)
                  and "actions" in ep["facts"] for ep in group)
    fs = [ep["facts"] for ep in group] if sokoban else []
    parts = [_rule_sokoban(ep["facts"], fs) if sokoban else _rule_generic(ep) for ep in group]
    # best: highest reward, then solved, then the shortest workflow (fewest moves); ties -> the first attempt
    best = max(range(G), key=lambda i: (rewards[i], solved[i], -len(parts[i][2])))
    head = f"{sum(solved)} of {G} attempts solved it (rewards {', '.join(f'{r:g}' for r in rewards)})."
    first = {}  # distinct mistake text -> the first attempt that made it, failed attempts first
    for i in sorted(range(G), key=lambda i: (solved[i], i)):
        first.setdefault(parts[i][1], i)
    notes = [f"Attempt {i + 1}: {m}" for m, i in first.items() if not m.startswith("None")]
    more = f" ({len(notes) - 3} more attempts with other mistakes.)" if len(notes) > 3 else ""
    mistake = " ".join(notes[:3]) + more if notes else "None: no attempt made a measurable mistake."
    if sokoban:
        kinds = [f"{sum(1 for f in fs if f.get(k))} of {G} attempts {what}." for k, what in _KINDS
                 if any(f.get(k) for f in fs)]
        best_done = max(float(f.get("completion", 0.0)) for f in fs)
        general = [f"{sum(solved)} of {G} attempts at one level solved it; the best ended with {best_done:.0%} "
                   "of the boxes on targets.", " ".join(kinds) or "No mistake was measured.", _numbered(_lessons(fs))]
    else:
        general = [f"{sum(solved)} of {G} attempts at one task succeeded.", mistake, GENERIC_ADVICE]
    return Skill(f"{head} Best attempt ({best + 1}): {parts[best][0]}", mistake, parts[best][2], general=general)


_MOVE_LIST = re.compile(r"\b(?:up|down|left|right)\b(?:[\s,;|>-]+(?:up|down|left|right)\b){2,}", re.I)


def _general_of(skill):
    """The pool part of a model-written skill: its two analyses, move lists scrubbed, no workflow."""
    scrub = lambda s: _MOVE_LIST.sub("(moves of that level omitted)", s)  # noqa: E731
    return [scrub(skill.success_analysis), scrub(skill.mistake_analysis), ""]


def summary_prompt(group, max_chars=6000, example=True):
    """The user message asking a model to summarise one task group (its attempts and rewards) into the skill JSON.
    Only the first line of an intermediate observation is shown (on Sokoban "Invalid answer..." or the turn
    counter; its map costs ~100 tokens a turn), the last one in full. example=False leaves out the literal
    format line: a 135M model echoes its "..." placeholders when a schema already fixes the form."""
    task = str(group[0].get("task", ""))[:2000]
    per = max(400, (max_chars - len(task)) // len(group))  # characters per attempt
    blocks = []
    for k, ep in enumerate(group):
        lines = [f"## Attempt {k + 1}: {'succeeded' if ep.get('success') else 'failed'}, "
                 f"reward {float(ep.get('reward', 0.0)):g}"]
        turns = ep.get("turns") or []
        for i, t in enumerate(turns):
            obs = str(t.get("observation", ""))
            lines += [f"Turn {i + 1} agent: {str(t.get('response', ''))[:300]}",
                      f"Turn {i + 1} environment: {obs[:400] if i == len(turns) - 1 else obs.split(chr(10))[0][:150]}"]
        if isinstance(ep.get("facts"), dict):  # measured facts keep a small summariser honest
            lines.append("Facts measured by the environment: " + json.dumps(ep["facts"])[:800])
        text = "\n".join(lines)
        blocks.append(text if len(text) <= per else text[:per // 2] + "\n...\n" + text[-per // 2:])  # keep start, end
    return (f"Below are {len(group)} attempts by an agent at the same task, with their rewards.\n\nTask:\n{task}\n\n"
            + "\n\n".join(blocks) + "\n\nCompare the better and the worse attempts and summarise them as a reusable "
            'skill for a future attempt at this task. Reply with only a JSON object with exactly three string fields: '
            '"success_analysis" (what the better attempts did right), "mistake_analysis" (what went wrong in the '
            'worse attempts and why), "golden_workflow" (the step-by-step procedure to follow next time). Keep each '
            'field under 120 words.' + (' Format:\n{"success_analysis": "...", "mistake_analysis": "...", '
                                        '"golden_workflow": "..."}' if example else ""))


def _count(stats, k, n=1):
    stats[k] = stats.get(k, 0) + n


SCHEMA = {"type": "object", "properties": {f: {"type": "string"} for f in FIELDS}, "required": list(FIELDS),
          "additionalProperties": False}
FORMATS = {  # structured-output modes, most specific first: request's response_format (None: plain text)
    # OpenAI's form (OpenAI, vLLM)
    "json_schema": {"type": "json_schema", "json_schema": {"name": "skill", "strict": True, "schema": SCHEMA}},
    # llama.cpp's form (OpenAI ignores the schema); maxLength bounds a runaway string (strict json_schema rejects it)
    "json_object": {"type": "json_object", "schema": {**SCHEMA, "properties": {
        f: {"type": "string", "maxLength": 800} for f in FIELDS}}},
    "text": None}


def _chat(url, model, prompt, stats, fmt, timeout, retries, backoff, max_tokens):
    """One chat completion -> (text or None, refused). refused: the server rejected the response_format (an
    HTTP error whose body names it). The key is read here and only ever placed in the request header: never
    stored, logged or put in stats."""
    msg = {"model": model, "temperature": 0.0, "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]}
    body = json.dumps(msg if fmt is None else {**msg, "response_format": fmt}).encode()
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Content-Type": "application/json", **({"Authorization": "Bearer " + key} if key else {})}
    for attempt in range(retries + 1):
        if attempt:
            _count(stats, "retries")
            time.sleep(backoff * 2 ** (attempt - 1))
        _count(stats, "requests")
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read().decode("utf-8", "replace"))["choices"][0]["message"]["content"], False
        except urllib.error.HTTPError as e:
            _count(stats, "http_errors")
            stats["last_error"], text = f"HTTP {e.code}", ""
            with contextlib.suppress(OSError):
                text = e.read(4000).decode("utf-8", "replace").lower()
            e.close()
            if fmt is not None and any(w in text for w in ("response_format", "json_schema", "json_object")):
                return None, True
            if e.code < 500 and e.code != 429:  # a client error will not go away by retrying
                return None, False
        except OSError as e:  # URLError, connection reset, socket timeout: worth another try
            timed_out = isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)
            _count(stats, "timeouts" if timed_out else "errors")
            stats["last_error"] = type(e).__name__
        except Exception as e:  # malformed response body
            _count(stats, "errors")
            stats["last_error"] = type(e).__name__
            return None, False
    return None, False


def _ask(url, model, prompt, stats, negotiated, structured, **opts):
    """One request in the best output mode the server accepts -> (text or None, mode); prompt(plain_text) builds
    the message (with the literal format example only in plain-text mode). negotiated[url] =
    (mode, confirmed) is shared by a summariser's threads: until an answer confirms a mode, requests go one at
    a time under negotiated["lock"], so a server is refused at most once per mode per run."""
    if not structured:
        return _chat(url, model, prompt(True), stats, None, **opts)[0], "text"
    modes, lock = list(FORMATS), negotiated.setdefault("lock", threading.Lock())
    while True:
        with contextlib.nullcontext() if negotiated.get(url, ("", False))[1] else lock:
            mode = negotiated.get(url, (modes[0], False))[0]
            text, refused = _chat(url, model, prompt(mode == "text"), stats, FORMATS[mode], **opts)
            if not refused:
                if text is not None:
                    negotiated[url] = (mode, True)
                return text, mode
            _count(stats, "refusals")
            stats["refused"] = mode
            negotiated[url] = (modes[modes.index(mode) + 1], False)  # "text" is never refused: fmt is None


def _safe(fn, group, stats):
    try:
        return fn(group)
    except Exception as e:  # odd facts from a new env version: no skill for this group, counted
        stats["last_error"] = f"{type(e).__name__}: {str(e)[:200]}"
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
    elif backend not in ("rule", "self", "oracle"):
        raise ValueError(f'unknown summariser backend {backend!r}; use "rule", "oracle", "self" or '
                         '"openai:<base_url>"')


def check_groups(groups):
    """groups -> list of lists; ValueError unless each group is a non-empty list of episode dicts of one task."""
    out = [g if isinstance(g, list) else None for g in groups]
    if any(not g or not all(isinstance(e, dict) for e in g) for g in out):
        raise ValueError("expected a list of groups, each a non-empty list of episode dicts (one task's episodes)")
    for g in out:
        if len({str(e.get("task_id")) for e in g}) != 1:
            raise ValueError(f"a group holds one task's episodes; got task ids {sorted({str(e.get('task_id')) for e in g})}")
    return out


def summarize(groups, backend="rule", step=0, complete=None, model=None, stats=None, timeout=60.0, retries=2,
              backoff=1.0, structured=True, max_tokens=768, negotiated=None):
    """Task groups -> skills, at most one per group (failures dropped and counted in `stats`).

    Raises ValueError only for malformed groups (a caller bug); a failing backend never raises.
    structured: ask an openai server for JSON output (negotiated; `negotiated` is the dict that remembers what the
    server accepted, shared across calls by AsyncSummarizer). stats (a dict, updated in place): groups, episodes,
    skills, dropped; for LLM backends parse_failures and replies_MODE / parsed_MODE per output mode (json_schema,
    json_object, text), format (the mode last used), refusals, requests, retries, timeouts, http_errors, errors,
    last_error."""
    groups = check_groups(groups)
    stats = {} if stats is None else stats
    _count(stats, "groups", len(groups))
    _count(stats, "episodes", sum(len(g) for g in groups))
    try:
        check_backend(backend, complete, model)
        modes = ["text"] * len(groups)
        if backend in ("rule", "oracle"):
            texts, out = None, [_safe(rule_skill if backend == "rule" else oracle_skill, g, stats) for g in groups]
        elif backend == "self":
            texts = list(complete([summary_prompt(g) for g in groups]))
        else:
            base = backend[7:].rstrip("/")
            url = base if base.endswith("/chat/completions") else base + "/chat/completions"
            name, negotiated = model or os.environ["SKILL_SD_SUMMARIZER_MODEL"], {} if negotiated is None else negotiated
            asked = [_ask(url, name, lambda text, g=g: summary_prompt(g, example=text), stats, negotiated, structured,
                          timeout=timeout, retries=retries, backoff=backoff, max_tokens=max_tokens) for g in groups]
            texts, modes = [a[0] for a in asked], [a[1] for a in asked]
            if modes:
                stats["format"] = modes[-1]
        if texts is not None:
            out = [parse_skill(t) if t is not None else None for t in texts]
            for t, s, mode in zip(texts, out, modes):
                if t is not None:
                    _count(stats, f"replies_{mode}")
                    _count(stats, f"parsed_{mode}", s is not None)
                    _count(stats, "parse_failures", s is None)
                if s is not None:
                    s.general = _general_of(s)
    except Exception as e:  # a broken backend costs skills, never the training run
        stats["last_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        out = [None] * len(groups)
    kept = []
    for g, s in zip(groups, out):
        if s is not None:
            s.task_id, s.reward, s.step = g[0].get("task_id"), max(float(e.get("reward", 0.0)) for e in g), step
            s.backend = backend.split(":")[0]
            kept.append(s)
    _count(stats, "skills", len(kept))
    _count(stats, "dropped", len(groups) - len(kept))
    return kept


class AsyncSummarizer:
    """Daemon worker threads around summarize(): submit() only enqueues (one job per group, `workers` in flight);
    collect() returns what has finished, in submission order.

    A group still queued when a newer group of the same task arrives is superseded (cancelled, counted), so a
    slow server holds at most one queued group per task instead of a backlog of ever older skills. self.stats
    counts groups: submitted == finished + cancelled + superseded + abandoned + running; finished - failed ==
    skills. close() cancels queued groups and abandons those in flight (daemon threads: neither close() nor the
    exit waits for a slow server). Backend "self" runs complete() in a worker thread: make it thread-safe, or
    use sync=True (summarise inside submit())."""

    def __init__(self, backend="rule", complete=None, workers=2, sync=False, **kw):
        check_backend(backend, complete, kw.get("model"))
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.backend, self.complete, self.sync, self.kw = backend, complete, sync, kw
        self.kw.setdefault("negotiated", {})  # the output format the server accepted, shared by all jobs
        self.stats = {"submitted": 0, "finished": 0, "failed": 0, "cancelled": 0, "superseded": 0, "abandoned": 0}
        self.lock, self.jobs = threading.Lock(), queue.SimpleQueue()  # jobs: what the worker threads take
        self.pending, self.ready, self.closed = [], [], False  # futures (one group each) in submission order
        self.threads = [threading.Thread(target=self._worker, name=f"skill-summarizer-{i}", daemon=True)
                        for i in range(0 if sync else workers)]
        for t in self.threads:
            t.start()

    def _job(self, groups, step, fut=None):
        local = {}
        skills = summarize(groups, self.backend, step, self.complete, stats=local, **self.kw)
        with self.lock:  # count and publish together, so close() never counts a group twice
            if self.closed:  # abandoned at close(): already counted there
                skills = []
            else:
                for k, v in local.items():
                    if isinstance(v, (int, float)):
                        _count(self.stats, k, v)
                    elif v is not None:
                        self.stats[k] = v
                self.stats["finished"] += len(groups)
                self.stats["failed"] += len(groups) - len(skills)
            if fut is not None:
                fut.set_result(skills)
        return skills

    def _worker(self):
        while (item := self.jobs.get()) is not None:
            fut, groups, step = item
            if fut.set_running_or_notify_cancel():  # False: cancelled by close() while queued
                try:
                    self._job(groups, step, fut)
                except Exception as e:  # a bug must not hang collect(): the group is lost, and said so
                    self.stats["last_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    if not fut.done():
                        fut.set_result([])

    def submit(self, groups, step):
        """groups: a list of groups, each a list of one task's episode dicts (this step's G episodes of it)."""
        groups = check_groups(groups)
        if self.closed:
            raise ValueError("submit() after close()")
        with self.lock:
            self.stats["submitted"] += len(groups)
        if self.sync:
            self.ready += self._job(groups, step)
            return
        for g in groups:
            fut = concurrent.futures.Future()
            fut.task_id = g[0].get("task_id")
            if fut.task_id is not None:  # cancel() is False for a group already in flight
                stale = [f for f in self.pending if f.task_id == fut.task_id and not f.cancelled() and f.cancel()]
                with self.lock:
                    self.stats["superseded"] += len(stale)
            self.pending.append(fut)
            self.jobs.put((fut, [g], step))

    def collect(self, wait_s=0.0):
        """Finished skills, in submission order. wait_s > 0: first wait up to wait_s seconds for all pending
        groups (a step may trade that much time for fresher skills); the default never blocks."""
        if wait_s > 0 and self.pending:
            concurrent.futures.wait(self.pending, timeout=wait_s)
        out, self.ready = self.ready, []
        while self.pending and self.pending[0].done():  # keep submission order: stop at the first unfinished
            fut = self.pending.pop(0)
            if not fut.cancelled():
                out += fut.result()
        return out

    def close(self, timeout=3.0):
        """Stop within about `timeout` seconds: cancel queued groups, abandon those in flight (both counted).
        Skills finished before the call can still be collected."""
        if self.closed:
            return
        cancelled = sum(1 for f in self.pending if not f.cancelled() and f.cancel())  # queued, not superseded
        for _ in self.threads:
            self.jobs.put(None)
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, end - time.monotonic()))
        with self.lock:
            self.closed = True
            self.stats["cancelled"] += cancelled
            self.stats["abandoned"] += sum(1 for f in self.pending if not f.done())


# ----------------------------------------------------------------------------------------------------------
# the bank

class SkillBank:
    """Skills kept per task (capacity_per_task each), level-agnostic skills in an environment-wide pool, UCB1.

    Arm reward (train.arm_rewards): for skill-sd the within-group correlation of the advantages with the
    teacher-minus-student gap, in [-1, 1]; for skill-aug-grpo the group's mean reward. UCB1 with a finite prior:
        n = prior_pulls + pulls,  mean = (prior * prior_pulls + value_sum) / n,  score = mean + c * sqrt(ln N / n)
    with N = the sum of n over the candidates; ties: the older skill, then a seeded order (same on every rank).
    Why a prior, not "untried arms first": a new skill arrives at every visit, so untried-first always picks the
    newest. c = 0.2 and 2 pseudo-pulls at 0 come from replaying train.py's order with null arms of sd 0.58 (a
    G = 4 correlation under no effect) and one better arm: with ~12 pulls in a list a fresh arm scores
    0.2 * sqrt(ln 12 / 2) = 0.22, so a skill whose mean stays above ~0.2 keeps winning, one at ~0 does not.
    A pick stays pending until update() or release() and is never evicted, so every selection gets its arm
    reward. Eviction from a full list: among arms not pending, the one ranked last by select's own key (lowest
    score; on ties the newest): the arm UCB is least likely to pick next, as a score only falls when pulled.
    A skill whose normalised text is already in its task list (pool) is not added there again."""

    COUNTERS = ("selects", "hits", "fallbacks", "ucb_picks", "added", "duplicates", "evictions", "updates", "releases")

    def __init__(self, capacity_per_task=4, global_capacity=64, c=0.2, seed=0, prior=0.0, prior_pulls=2.0):
        if not (capacity_per_task >= 1 and global_capacity >= 0 and c >= 0 and prior_pulls > 0
                and math.isfinite(prior) and math.isfinite(prior_pulls)):
            raise ValueError(f"need capacity_per_task >= 1, global_capacity >= 0, c >= 0, prior_pulls > 0 and a finite "
                             f"prior; got {capacity_per_task=}, {global_capacity=}, {c=}, {prior_pulls=}, {prior=}")
        self.capacity_per_task, self.global_capacity, self.c, self.seed = capacity_per_task, global_capacity, c, seed
        self.prior, self.prior_pulls = float(prior), float(prior_pulls)
        self.skills, self.tasks, self.pool = {}, {}, []  # uid -> Skill; str(task_id) -> [uid]; [uid]
        self.pending, self.next_uid = {}, 0  # pending: uid -> selections still waiting for update() or release()
        self.counters = dict.fromkeys(self.COUNTERS, 0)

    def _scores(self, uids):
        """uid -> selection key over one candidate list: UCB score, then the older skill (it has waited longer:
        fresh skills are tried in arrival order, not pushed out by newer ones), then a seeded order."""
        n = {u: self.prior_pulls + self.skills[u].pulls for u in uids}
        log_n = math.log(max(sum(n.values()), 1.0))
        return {u: ((self.prior * self.prior_pulls + self.skills[u].value_sum) / n[u] + self.c * math.sqrt(log_n / n[u]),
                    -self.skills[u].step, random.Random(self.seed * 1_000_003 + u).random()) for u in uids}

    def _insert(self, uids, skill, capacity):
        """Returns 'dup', or whether the skill survived the capacity check."""
        if any(self.skills[u].key() == skill.key() for u in uids):
            return "dup"
        skill.uid, self.next_uid = self.next_uid, self.next_uid + 1
        self.skills[skill.uid] = skill
        uids.append(skill.uid)
        while len(uids) > capacity:  # the newcomer is never pending, so there is always a candidate
            uids.remove(min((u for u in uids if not self.pending.get(u)), key=self._scores(uids).__getitem__))
            self.counters["evictions"] += 1
        return skill.uid in uids

    def add(self, skill):
        """Store a summarised skill in its task's list and its level-agnostic part (skill.general) in the pool.
        Sets skill.uid. Returns True if either was kept."""
        res = []
        if skill.task_id is not None:
            res.append(self._insert(self.tasks.setdefault(str(skill.task_id), []), skill, self.capacity_per_task))
        if skill.general and self.global_capacity:
            pooled = Skill(*skill.general, task_id=skill.task_id, reward=skill.reward, step=skill.step,
                           backend=skill.backend, scope="pool")
            res.append(self._insert(self.pool, pooled, self.global_capacity))
        kept = True in res
        self.counters["added"] += kept
        self.counters["duplicates"] += "dup" in res
        self.tasks = {k: v for k, v in self.tasks.items() if v}
        live = set(self.pool).union(*self.tasks.values())
        self.skills = {u: s for u, s in self.skills.items() if u in live}
        return kept

    def select(self, task_id, fallback="pool"):
        """The top-UCB skill of this task; if it has none, the pool's (fallback="pool") or None ("none").
        The pick stays pending (never evicted) until update() or release() is called for it."""
        if fallback not in ("pool", "none"):
            raise ValueError(f'fallback must be "pool" or "none", got {fallback!r}')
        self.counters["selects"] += 1
        uids = self.tasks.get(str(task_id))
        if uids:
            self.counters["hits"] += 1
        elif fallback == "pool" and self.pool:
            uids = self.pool
            self.counters["fallbacks"] += 1
        else:
            return None
        u = max(uids, key=self._scores(uids).__getitem__)
        self.counters["ucb_picks"] += self.skills[u].pulls > 0  # chosen among tried arms, not a fresh one
        self.pending[u] = self.pending.get(u, 0) + 1
        return self.skills[u]

    def _settle(self, skill):
        k = self.pending.pop(skill.uid, 0)
        if k > 1:
            self.pending[skill.uid] = k - 1

    def update(self, skill, arm_reward):
        """One arm reward for a selected skill; clears one pending selection of it."""
        arm_reward = float(arm_reward)
        if not math.isfinite(arm_reward):
            raise ValueError(f"arm reward must be a finite number, got {arm_reward}")
        skill.pulls += 1
        skill.value_sum += arm_reward
        self.counters["updates"] += 1
        self._settle(skill)

    def release(self, skill):
        """A selected skill whose group gives no arm reward (e.g. zero reward variance): clear its pending pick."""
        self.counters["releases"] += 1
        self._settle(skill)

    def metrics(self):
        n = max(self.counters["selects"], 1)
        pulls = sum(s.pulls for s in self.skills.values())
        return {"size": len(self.skills), "tasks": len(self.tasks), "pool": len(self.pool),
                "pending": sum(self.pending.values()), "hit_rate": self.counters["hits"] / n,
                "fallback_rate": self.counters["fallbacks"] / n, "ucb_pick_rate": self.counters["ucb_picks"] / n,
                "mean_arm_reward": sum(s.value_sum for s in self.skills.values()) / pulls if pulls else 0.0,
                **self.counters}

    def state_dict(self):
        return {"version": 2, "capacity_per_task": self.capacity_per_task, "global_capacity": self.global_capacity,
                "c": self.c, "seed": self.seed, "prior": self.prior, "prior_pulls": self.prior_pulls,
                "next_uid": self.next_uid, "counters": dict(self.counters),
                "skills": [asdict(s) for s in self.skills.values()], "tasks": {k: list(v) for k, v in self.tasks.items()},
                "pool": list(self.pool), "pending": sorted(self.pending.items())}

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
        """Format versions 1 (no pending picks, no prior: it loads with the defaults) and 2."""
        try:
            d = json.load(open(path))
            if d.get("version") not in (1, 2):
                raise ValueError(f"unknown format version {d.get('version')!r} (this code reads 1 and 2)")
            bank = cls(d["capacity_per_task"], d["global_capacity"], d["c"], d["seed"],
                       d.get("prior", 0.0), d.get("prior_pulls", 2.0))
            names = {f.name for f in fields(Skill)}
            bank.skills = {s["uid"]: Skill(**{k: v for k, v in s.items() if k in names}) for s in d["skills"]}
            bank.tasks, bank.pool = {k: list(v) for k, v in d["tasks"].items()}, list(d["pool"])
            bank.pending = {int(u): int(k) for u, k in d.get("pending", [])}
            bank.next_uid = d["next_uid"]
            bank.counters.update(d["counters"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path} is not a skill bank saved by SkillBank.save ({type(e).__name__}: {e})")
        return bank


def teacher_prompt(skill, task_prompt):
    """The teacher's system message: the task rules, then the skill in a delimited block, one line a field
    (skill=None: the rules unchanged). A pool skill is labelled as another level's, its empty fields left out.
    Only the teacher sees this; the student keeps the plain task prompt."""
    if skill is None:
        return task_prompt
    pool = skill.scope == "pool"
    rows = [("Success analysis", skill.success_analysis), ("Mistake analysis", skill.mistake_analysis),
            ("General workflow" if pool else "Golden workflow", skill.golden_workflow)]
    head = "### Skill from other levels (not this one)" if pool else "### Skill from earlier attempts at this task"
    return "\n".join([f"{task_prompt}\n\n{head}"] + [f"{k}: {v}" for k, v in rows if v or not pool]
                     + ["### End of skill"])
