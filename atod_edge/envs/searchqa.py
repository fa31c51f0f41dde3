"""`searchqa`: Search-R1-style question answering over a generated knowledge world.

A world of countries, cities, companies, universities and people is generated once per process
from a fixed seed and rendered into a corpus, one short passage per entity. A task asks a
single-hop question ("where was mara kelvo born?") or a two-hop one ("in which country is the
city where mara kelvo was born?"). The agent acts with

    search[query]   the top-3 passages for the query (BM25 over the corpus)
    answer[text]    ends the episode; reward 1 if the answer matches exactly (after
                    normalising case, punctuation, articles and spaces), else 0

The episode also ends, with reward 0, after `max_turns` steps.

Splits: train and eval ask about the same relations (disjoint seeds, hashed from the split
name). `unseen` asks only about the `studied_at` relation and university entities, which
train/eval questions never involve (the passages mention them, as they mention everything).

`admissible_actions()` cannot enumerate free text: it returns the two action templates
["search[<query>]", "answer[<text>]"]; any filled-in template is a valid action.
"""

from __future__ import annotations

import functools
import random
import re
import string
from dataclasses import dataclass
from typing import Any

from atod_edge.envs.text import MAX_QUERY_TOKENS, MAX_TOKEN_CHARS, TOKEN_RE, clip, query_tokens  # noqa: F401
from atod_edge.envs.base import Env, StepResult, Task

WORLD_SEED = 20261106
TOP_K = 3
N_COUNTRIES, CITIES_PER_COUNTRY = 12, 4
N_COMPANIES, N_UNIVERSITIES, N_PEOPLE = 48, 12, 200
ACTION_TEMPLATES = ["search[<query>]", "answer[<text>]"]

FIRST_NAMES = ("anna", "omar", "lena", "ivan", "maya", "theo", "nina", "ravi", "sara", "jonas",
               "elif", "kofi", "lucia", "tomas", "yuki", "amir", "clara", "felix", "hana", "diego")
COMPANY_KINDS = ("labs", "foods", "motors", "media", "bank", "energy", "systems", "studio")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "kr", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "s")

_ACTION_RE = re.compile(r"^\s*([a-zA-Z_]+)\s*\[(.*)\]\s*$", re.DOTALL)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)

# question templates: relation path -> phrasing ({x} is the subject's name)
SEEN_QUESTIONS: dict[tuple[str, ...], str] = {
    ("born_in",): "where was {x} born?",
    ("works_for",): "which company does {x} work for?",
    ("country_of",): "in which country is {x}?",
    ("founded_by",): "who founded {x}?",
    ("based_in",): "in which city is {x} based?",
    ("capital",): "what is the capital of {x}?",
    ("born_in", "country_of"): "in which country is the city where {x} was born?",
    ("works_for", "based_in"): "in which city is the company {x} works for based?",
    ("founded_by", "born_in"): "where was the founder of {x} born?",
    ("works_for", "founded_by"): "who founded the company that {x} works for?",
    ("based_in", "country_of"): "in which country is the city where {x} is based?",
}
UNSEEN_QUESTIONS: dict[tuple[str, ...], str] = {
    ("studied_at",): "which university did {x} attend?",
    ("university_city",): "in which city is {x}?",
    ("studied_at", "university_city"): "in which city is the university {x} attended?",
    ("founded_by", "studied_at"): "which university did the founder of {x} attend?",
    ("university_city", "country_of"): "in which country is the city where {x} is located?",
}
UNSEEN_RELATIONS = ("studied_at", "university_city")


def tokenize(text: str) -> list[str]:
    return TOKEN_RE.findall(text.lower())


def normalise_answer(text: str) -> str:
    """SQuAD-style: lower case, drop punctuation and articles, collapse spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())






@dataclass(frozen=True)
class Question:
    text: str
    relations: tuple[str, ...]
    subject: str
    hops: tuple[str, ...]       # entity names along the path: subject, bridge..., answer
    answer: str


class World:
    """Entities, relations (name -> {relation: object name}) and the passage corpus with BM25."""

    def __init__(self, seed: int = WORLD_SEED):
        from rank_bm25 import BM25Okapi  # only the retrieval envs need it

        rng = random.Random(seed)
        used: set[str] = set(FIRST_NAMES) | set(COMPANY_KINDS)
        self.kind: dict[str, str] = {}
        self.facts: dict[str, dict[str, str]] = {}

        countries = [self._new_name(rng, used) for _ in range(N_COUNTRIES)]
        cities: list[str] = []
        for country in countries:
            own = [self._new_name(rng, used) for _ in range(CITIES_PER_COUNTRY)]
            self._add(country, "country", {"capital": own[0]})
            for city in own:
                self._add(city, "city", {"country_of": country})
            cities += own
        universities = [f"{self._new_name(rng, used)} university" for _ in range(N_UNIVERSITIES)]
        for university in universities:
            self._add(university, "university", {"university_city": rng.choice(cities)})
        last_names = [self._new_name(rng, used) for _ in range(N_PEOPLE)]
        people = [f"{rng.choice(FIRST_NAMES)} {last}" for last in last_names]
        companies = [f"{self._new_name(rng, used)} {rng.choice(COMPANY_KINDS)}" for _ in range(N_COMPANIES)]
        founders = rng.sample(people, N_COMPANIES)
        for company, founder in zip(companies, founders):
            self._add(company, "company", {"based_in": rng.choice(cities), "founded_by": founder})
        for person in people:
            self._add(person, "person", {"born_in": rng.choice(cities), "works_for": rng.choice(companies),
                                         "studied_at": rng.choice(universities)})

        self.names = list(self.facts)
        self.passages = [self._passage(name) for name in self.names]
        # the title is part of the document so an entity's own passage ranks first for its name
        self._bm25 = BM25Okapi([tokenize(f"{name} {text}") for name, text in zip(self.names, self.passages)])
        self.vocabulary = sorted({t for p in self.passages for t in tokenize(p)})

    @staticmethod
    def _new_name(rng: random.Random, used: set[str]) -> str:
        while True:
            name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))
            name += rng.choice(_CODAS)
            if name not in used:
                used.add(name)
                return name

    def _add(self, name: str, kind: str, facts: dict[str, str]) -> None:
        self.kind[name] = kind
        self.facts[name] = facts

    def _passage(self, name: str) -> str:
        kind, f = self.kind[name], self.facts[name]
        if kind == "country":
            return f"{name} is a country. its capital is {f['capital']}."
        if kind == "city":
            text = f"{name} is a city in {f['country_of']}."
            if self.facts[f["country_of"]]["capital"] == name:
                text += f" it is the capital of {f['country_of']}."
            return text
        if kind == "university":
            return f"{name} is a university in {f['university_city']}."
        if kind == "company":
            return f"{name} is a company based in {f['based_in']}. it was founded by {f['founded_by']}."
        return (f"{name} was born in {f['born_in']}, works for {f['works_for']} "
                f"and studied at {f['studied_at']}.")

    def subjects_for(self, relation: str) -> list[str]:
        return [name for name, facts in self.facts.items() if relation in facts]

    @functools.lru_cache(maxsize=65536)
    def search(self, query: tuple[str, ...]) -> tuple[int, ...]:
        """Indices of the TOP_K passages for the query (ties by corpus order), matches only.
        Cached per query: agents and the expert repeat queries, and scoring is the costly step."""
        scores = self._bm25.get_scores(list(query))
        ranked = sorted((i for i in range(len(scores)) if scores[i] > 0), key=lambda i: (-scores[i], i))
        return tuple(ranked[:TOP_K])


@functools.lru_cache(maxsize=1)
def world() -> World:
    """The process-wide world (deterministic: identical in every process)."""
    return World()


def make_question(task: Task) -> Question:
    """Pick a relation path for the split (half single-hop, half two-hop) and a subject."""
    rng = random.Random(task.seed)
    templates = UNSEEN_QUESTIONS if task.split == "unseen" else SEEN_QUESTIONS
    hops_wanted = rng.choice((1, 2))
    paths = [p for p in templates if len(p) == hops_wanted]
    relations = rng.choice(paths)
    w = world()
    subject = rng.choice(w.subjects_for(relations[0]))
    hops = [subject]
    for relation in relations:
        hops.append(w.facts[hops[-1]][relation])
    return Question(templates[relations].format(x=subject), relations, subject, tuple(hops), hops[-1])


class SearchQAEnv(Env):
    """Answer a question by searching a local passage corpus."""

    name = "searchqa"
    max_turns = 4
    description = "Search-R1-style QA: BM25 search over a generated corpus, exact-match answers"
    instructions = (
        "Answer the question. You can search a small encyclopedia.\n"
        "Actions: search[query] shows the top 3 passages; answer[text] gives your final answer."
    )

    def __init__(self) -> None:
        self.world = world()
        self.question: Question | None = None
        self.queries: list[tuple[str, ...]] = []
        self.turn = 0
        self.done = True

    def reset(self, task: Task) -> str:
        self.question = make_question(task)
        self.queries = []
        self.turn = 0
        self.done = False
        return f"question: {self.question.text}"

    def step(self, action: str) -> StepResult:
        if self.done or self.question is None:
            return StepResult("the episode is over: call reset.", 0.0, True,
                              self._info(valid=False, feedback="episode is over"))
        self.turn += 1
        observation, valid, feedback, answered = self._apply(action if isinstance(action, str) else "")
        score = 0.0
        if answered is not None:
            self.done = True
            score = float(answered)
        elif self.turn >= self.max_turns:
            self.done = True
            observation += "\nout of turns: the episode ended without an answer."
        return StepResult(observation, score, self.done,
                          self._info(valid=valid, feedback=feedback, won=score == 1.0, score=score))

    def admissible_actions(self) -> list[str]:
        """The action templates: free text cannot be enumerated, any filled template is valid."""
        return [] if self.done else list(ACTION_TEMPLATES)

    def expert_action(self) -> str:
        """Search each entity on the question's path (subject, then bridges), then answer."""
        q = self.question
        if q is None or self.done:
            return "answer[]"
        for entity in q.hops[:-1]:
            if query_tokens(entity) not in self.queries:
                return f"search[{entity}]"
        return f"answer[{q.answer}]"

    def _apply(self, action: str) -> tuple[str, bool, str, bool | None]:
        """-> (observation, valid, feedback, answered correctly or None if not an answer)."""
        match = _ACTION_RE.match(action)
        if match is None:
            return self._invalid(f"'{clip(action)}' is not an action. use search[query] or answer[text]")
        verb, argument = match.group(1).lower(), match.group(2)
        if verb == "search":
            query = query_tokens(argument)
            if not query:
                return self._invalid("search needs words, e.g. search[anna velmor]")
            self.queries.append(query)
            hits = self.world.search(query)
            if not hits:
                return f"no passages match '{' '.join(query)}'. try other words.", True, "", None
            # every passage starts with its entity's name, so no separate title is shown
            lines = [f"{rank}. {self.world.passages[i]}" for rank, i in enumerate(hits, 1)]
            return "\n".join(lines), True, "", None
        if verb == "answer":
            given = normalise_answer(argument)
            if not given:
                return self._invalid("answer needs text, e.g. answer[velmora]")
            correct = given == normalise_answer(self.question.answer)
            return f"you answered '{clip(given)}'. {'correct' if correct else 'wrong'}.", True, "", correct
        return self._invalid(f"unknown action '{clip(verb)}'. use search[query] or answer[text]")

    @staticmethod
    def _invalid(feedback: str) -> tuple[str, bool, str, None]:
        return f"invalid action: {feedback}", False, feedback, None

    def _info(self, valid: bool, feedback: str = "", won: bool = False, score: float = 0.0) -> dict[str, Any]:
        return {"valid": valid, "won": won, "score": score,
                "admissible": self.admissible_actions(), "feedback": feedback}
