"""`shop`: a WebShop-style shopping environment over a generated catalog.

The agent reads an instruction such as

    i need a waterproof jacket in blue, size m, price lower than 60.00 dollars

and acts with

    search[query]            ranked results (BM25 over the catalog), 4 per page
    click[next] / click[prev]  turn the results page
    click[p042] or click[<product title>]  open a product from the current page
    click[<option value>]    choose an option (size, colour) on a product page
    click[back]              product page -> results -> search page
    click[buy]               buy the open product with the chosen options; ends the episode

The reward is given on buy only: the WebShop match score (see `match_score`), in [0, 1];
won means score 1.0. The episode also ends, with reward 0, after `max_turns` steps.

The catalog (about 330 products in 16 categories) is generated once per process from a fixed
seed and cached. Every task's target is a catalog product, so a matching product always exists.
Splits: train and eval draw targets from the same 12 categories (disjoint seeds, hashed from the
split name); `unseen` draws them only from 4 held-out categories that train/eval never ask for.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from dataclasses import dataclass, field
from typing import Any

from atod_edge.envs.text import MAX_QUERY_TOKENS, MAX_TOKEN_CHARS, TOKEN_RE, clip, query_tokens  # noqa: F401
from atod_edge.envs.base import Env, StepResult, Task

CATALOG_SEED = 20261105
RESULTS_PER_PAGE = 4
MAX_RESULTS = 20          # results beyond this are not shown (5 pages)
PRODUCTS_PER_ATTRIBUTE_SET = 2

_SIZES_CLOTHING = ("xs", "s", "m", "l", "xl")
_SIZES_BOOT = ("7", "8", "9", "10", "11")
_SIZES_BED = ("twin", "queen", "king")
_SIZES_VOLUME = ("8 oz", "12 oz", "16 oz", "32 oz")
_COLOURS = ("black", "white", "blue", "red", "green", "grey")

# category -> (attributes, option kinds with their values, price range in dollars)
CATEGORIES: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]], tuple[float, float]]] = {
    "jacket": (("waterproof", "breathable", "insulated", "lightweight", "packable"),
               {"size": _SIZES_CLOTHING, "colour": _COLOURS}, (30, 120)),
    "backpack": (("waterproof", "lightweight", "durable", "padded"), {"colour": _COLOURS}, (20, 90)),
    "tent": (("waterproof", "lightweight", "durable", "portable"), {"colour": _COLOURS}, (60, 250)),
    "headset": (("wireless", "foldable", "rechargeable", "lightweight"), {"colour": _COLOURS}, (20, 150)),
    "lamp": (("rechargeable", "dimmable", "portable", "wireless"), {"colour": _COLOURS}, (15, 70)),
    "tea": (("organic", "decaf", "herbal", "loose"), {"size": _SIZES_VOLUME}, (5, 30)),
    "shampoo": (("organic", "vegan", "unscented", "hypoallergenic"), {"size": _SIZES_VOLUME}, (5, 30)),
    "mug": (("insulated", "leakproof", "durable", "lightweight"),
            {"size": _SIZES_VOLUME, "colour": _COLOURS}, (8, 40)),
    "sweater": (("washable", "lightweight", "insulated", "organic"),
                {"size": _SIZES_CLOTHING, "colour": _COLOURS}, (25, 100)),
    "watch": (("waterproof", "rechargeable", "wireless", "lightweight"), {"colour": _COLOURS}, (30, 200)),
    "charger": (("wireless", "portable", "fast", "foldable"), {"colour": _COLOURS}, (10, 50)),
    "pillow": (("organic", "hypoallergenic", "washable", "cooling"),
               {"size": _SIZES_BED, "colour": _COLOURS}, (15, 70)),
    # held out: only the `unseen` split asks for these
    "boot": (("waterproof", "insulated", "durable", "lightweight"),
             {"size": _SIZES_BOOT, "colour": _COLOURS}, (40, 160)),
    "speaker": (("wireless", "waterproof", "portable", "rechargeable"), {"colour": _COLOURS}, (20, 150)),
    "coffee": (("organic", "decaf", "vegan", "loose"), {"size": _SIZES_VOLUME}, (6, 35)),
    "blanket": (("washable", "lightweight", "insulated", "waterproof"),
                {"size": _SIZES_BED, "colour": _COLOURS}, (20, 90)),
}
UNSEEN_CATEGORIES = ("boot", "speaker", "coffee", "blanket")
SEEN_CATEGORIES = tuple(c for c in CATEGORIES if c not in UNSEEN_CATEGORIES)
BRANDS = ("acme", "nordik", "sunpeak", "bluefin", "terra", "vela", "orbit", "maple",
          "zenith", "pinecrest", "lumo", "kiva")
# where the wrong category is bought, the WebShop-style score keeps a small partial credit
WRONG_CATEGORY_FACTOR = 0.1

_ACTION_RE = re.compile(r"^\s*([a-zA-Z_]+)\s*\[(.*)\]\s*$", re.DOTALL)


def tokenize(text: str) -> list[str]:
    """Lower-case alphanumeric tokens: the retriever's and the matcher's view of text."""
    return TOKEN_RE.findall(text.lower())


def _normalise(text: str) -> str:
    return " ".join(tokenize(text))






@dataclass(frozen=True)
class Product:
    id: str
    title: str
    category: str
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]]   # kind -> values offered
    price: float

    def search_text(self) -> str:
        values = " ".join(v for vs in self.options.values() for v in vs)
        return f"{self.title} {self.category} {' '.join(self.attributes)} {values}"


@dataclass(frozen=True)
class Goal:
    """What the instruction asks for; `target_id` is one product that satisfies it."""

    category: str
    attributes: tuple[str, ...]
    options: dict[str, str]               # kind -> wanted value
    price_limit: float
    target_id: str
    instruction: str


class Catalog:
    """The generated products plus a BM25 index over them (built once per process)."""

    def __init__(self, products: list[Product]):
        from rank_bm25 import BM25Okapi  # light, but only the shop and searchqa envs need it

        self.products = products
        self.by_id = {p.id: p for p in products}
        self.by_title = {_normalise(p.title): p for p in products}
        assert len(self.by_title) == len(products), "product titles must be unique"
        self._bm25 = BM25Okapi([tokenize(p.search_text()) for p in products])
        self.vocabulary = sorted({t for p in products for t in tokenize(p.search_text())})

    @functools.lru_cache(maxsize=65536)
    def search(self, query: tuple[str, ...]) -> tuple[str, ...]:
        """Product ids ranked by BM25 score (ties by catalog order), matches only, at most MAX_RESULTS.

        Cached per query: agents (and the expert) repeat queries a lot, and scoring is the
        only costly step in the env.
        """
        if not query:
            return ()
        scores = self._bm25.get_scores(list(query))
        order = sorted((i for i in range(len(scores)) if scores[i] > 0), key=lambda i: (-scores[i], i))
        return tuple(self.products[i].id for i in order[:MAX_RESULTS])


def generate_catalog(seed: int = CATALOG_SEED) -> list[Product]:
    """Every category gets products for each single attribute and each attribute pair,
    PRODUCTS_PER_ATTRIBUTE_SET of each with distinct brands, random option subsets and prices."""
    rng = random.Random(seed)
    drafts = []
    for category, (attributes, option_kinds, (low, high)) in CATEGORIES.items():
        attribute_sets = [(a,) for a in attributes] + list(itertools.combinations(attributes, 2))
        for attribute_set in attribute_sets:
            for brand in rng.sample(BRANDS, PRODUCTS_PER_ATTRIBUTE_SET):
                options = {}
                for kind, values in option_kinds.items():
                    count = rng.randint(2, min(4, len(values)))
                    chosen = set(rng.sample(values, count))
                    options[kind] = tuple(v for v in values if v in chosen)  # keep the natural order
                price = round(rng.uniform(low, high), 2)
                title = f"{brand} {' '.join(attribute_set)} {category}"
                drafts.append((title, category, attribute_set, options, price))
    rng.shuffle(drafts)  # ids carry no hint of the category
    return [Product(f"p{i:03d}", title, category, attrs, options, price)
            for i, (title, category, attrs, options, price) in enumerate(drafts)]


@functools.lru_cache(maxsize=1)
def catalog() -> Catalog:
    """The process-wide catalog (deterministic: same products and ids in every process)."""
    return Catalog(generate_catalog())


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def make_goal(task: Task) -> Goal:
    """Draw the task's target product and phrase an instruction it satisfies."""
    rng = random.Random(task.seed)
    categories = UNSEEN_CATEGORIES if task.split == "unseen" else SEEN_CATEGORIES
    target = rng.choice([p for p in catalog().products if p.category in categories])
    count = rng.randint(1, len(target.attributes))
    wanted = set(rng.sample(target.attributes, count))
    attributes = tuple(a for a in target.attributes if a in wanted)
    options = {kind: rng.choice(values) for kind, values in target.options.items()}
    price_limit = float((int(target.price // 10) + 1) * 10)

    text = "i need " + _with_article(f"{' and '.join(attributes)} {target.category}")
    if "colour" in options:
        text += f" in {options['colour']}"
    if "size" in options:
        text += f", size {options['size']}"
    text += f", price lower than {price_limit:.2f} dollars"
    return Goal(target.category, attributes, options, price_limit, target.id, text)


def satisfies(product: Product, goal: Goal) -> bool:
    """Whether buying `product` with the right options can reach score 1."""
    return (product.category == goal.category
            and set(goal.attributes) <= set(product.attributes)
            and product.price < goal.price_limit
            and all(value in product.options.get(kind, ()) for kind, value in goal.options.items()))


def match_score(product: Product, chosen: dict[str, str], goal: Goal) -> float:
    """WebShop's reward: (attributes matched + options matched + price ok) / (their count),
    times 1 for the right category or WRONG_CATEGORY_FACTOR for another one."""
    matched = sum(a in product.attributes for a in goal.attributes)
    matched += sum(chosen.get(kind) == value for kind, value in goal.options.items())
    matched += product.price < goal.price_limit
    total = len(goal.attributes) + len(goal.options) + 1
    type_factor = 1.0 if product.category == goal.category else WRONG_CATEGORY_FACTOR
    return type_factor * matched / total


@dataclass
class _Page:
    """Where the agent is: 'search', 'results' (query, page) or 'product'."""

    kind: str = "search"
    query: tuple[str, ...] = ()
    results: tuple[str, ...] = ()
    page: int = 0
    product_id: str | None = None
    chosen: dict[str, str] = field(default_factory=dict)


class ShopEnv(Env):
    """WebShop-style shopping: search, browse, choose options, buy."""

    name = "shop"
    max_turns = 15
    description = "WebShop-style shopping over a generated catalog (BM25 search, options, buy)"
    instructions = (
        "You are shopping online. Find and buy the product that matches the instruction.\n"
        "Actions: search[query], click[next], click[prev], click[product id or title], "
        "click[option value], click[back], click[buy]."
    )

    def __init__(self) -> None:
        self.catalog = catalog()
        self.goal: Goal | None = None
        self.state = _Page()
        self.turn = 0
        self.done = True

    # -- protocol ---------------------------------------------------------------------------

    def reset(self, task: Task) -> str:
        self.goal = make_goal(task)
        self.state = _Page()
        self.turn = 0
        self.done = False
        return f"instruction: {self.goal.instruction}\nsearch for products: search[query]"

    def step(self, action: str) -> StepResult:
        if self.done or self.goal is None:
            return StepResult("the episode is over: call reset.", 0.0, True,
                              self._info(valid=False, feedback="episode is over"))
        self.turn += 1
        observation, valid, feedback, reward, bought = self._apply(action if isinstance(action, str) else "")
        score = reward if bought else 0.0
        won = bought and score >= 1.0 - 1e-9
        if bought:
            self.done = True
        elif self.turn >= self.max_turns:
            self.done = True
            observation += "\nout of turns: the episode ended without a purchase."
        return StepResult(observation, reward, self.done,
                          self._info(valid=valid, feedback=feedback, won=won, score=score))

    def admissible_actions(self) -> list[str]:
        """Concrete actions valid now; `search[<query>]` is a template (any query is valid)."""
        if self.done:
            return []
        state = self.state
        actions = ["search[<query>]"]
        if state.kind == "results":
            actions += [f"click[{pid}]" for pid in self._visible()]
            if state.page > 0:
                actions.append("click[prev]")
            if (state.page + 1) * RESULTS_PER_PAGE < len(state.results):
                actions.append("click[next]")
            actions.append("click[back]")
        elif state.kind == "product":
            product = self.catalog.by_id[state.product_id]
            actions += [f"click[{v}]" for values in product.options.values() for v in values]
            actions += ["click[buy]", "click[back]"]
        return actions

    def expert_action(self) -> str:
        """Search the instruction's key terms, page to a product that satisfies the goal,
        choose the wanted options, buy. Falls back to searching the target's title."""
        goal, state = self.goal, self.state
        if goal is None or self.done:
            return "search[]"
        query = f"{' '.join(goal.attributes)} {goal.category}"
        fallback = self.catalog.by_id[goal.target_id].title
        if state.kind == "product":
            product = self.catalog.by_id[state.product_id]
            if not satisfies(product, goal):
                return "click[back]"
            for kind, value in goal.options.items():
                if state.chosen.get(kind) != value:
                    return f"click[{value}]"
            return "click[buy]"
        if state.kind == "results" and state.query in (query_tokens(query), query_tokens(fallback)):
            for pid in self._visible():
                if satisfies(self.catalog.by_id[pid], goal):
                    return f"click[{pid}]"
            if (state.page + 1) * RESULTS_PER_PAGE < len(state.results):
                return "click[next]"
            return f"search[{fallback}]"
        return f"search[{query}]"

    # -- actions ----------------------------------------------------------------------------

    def _apply(self, action: str) -> tuple[str, bool, str, float, bool]:
        """-> (observation, valid, feedback, reward, bought)."""
        match = _ACTION_RE.match(action)
        if match is None:
            return self._invalid(f"'{clip(action)}' is not an action. use search[query] or click[...]")
        verb, argument = match.group(1).lower(), match.group(2)
        if verb == "search":
            return self._search(argument)
        if verb == "click":
            return self._click(_normalise(argument), argument)
        return self._invalid(f"unknown action '{clip(verb)}'. use search[query] or click[...]")

    def _invalid(self, feedback: str) -> tuple[str, bool, str, float, bool]:
        return f"invalid action: {feedback}", False, feedback, 0.0, False

    def _search(self, raw_query: str) -> tuple[str, bool, str, float, bool]:
        query = query_tokens(raw_query)
        if not query:
            return self._invalid("search needs words, e.g. search[waterproof jacket]")
        self.state = _Page("results", query, self.catalog.search(query))
        return self._render_results(), True, "", 0.0, False

    def _click(self, target: str, raw: str) -> tuple[str, bool, str, float, bool]:
        state = self.state
        if target == "back":
            if state.kind == "product":
                state.kind, state.product_id, state.chosen = "results", None, {}
                return self._render_results(), True, "", 0.0, False
            if state.kind == "results":
                self.state = _Page()
                return "search for products: search[query]", True, "", 0.0, False
            return self._invalid("you are on the search page: nothing to go back to")
        if state.kind == "results":
            if target in ("next", "prev"):
                step = 1 if target == "next" else -1
                new_page = state.page + step
                if new_page < 0 or new_page * RESULTS_PER_PAGE >= len(state.results):
                    return self._invalid(f"there is no {target} page")
                state.page = new_page
                return self._render_results(), True, "", 0.0, False
            visible = self._visible()
            pid = next((p for p in visible if target in (p, _normalise(self.catalog.by_id[p].title))), None)
            if pid is None:
                return self._invalid(f"cannot click '{clip(raw)}' here. you can click: "
                                     f"{', '.join(visible + self._page_buttons())}")
            state.kind, state.product_id, state.chosen = "product", pid, {}
            return self._render_product(), True, "", 0.0, False
        if state.kind == "product":
            product = self.catalog.by_id[state.product_id]
            if target == "buy":
                score = match_score(product, state.chosen, self.goal)
                return (f"you bought {product.id} {product.title}. score {score:.2f}",
                        True, "", score, True)
            for kind, values in product.options.items():
                if target in values:
                    state.chosen[kind] = target
                    chosen = ", ".join(f"{k} {v}" for k, v in state.chosen.items())
                    return f"selected {kind} {target} (now: {chosen})", True, "", 0.0, False
            offered = ", ".join(v for vs in product.options.values() for v in vs)
            return self._invalid(f"cannot click '{clip(raw)}' here. options: {offered}; or buy, back")
        return self._invalid("search first: search[query]")

    # -- rendering --------------------------------------------------------------------------

    def _visible(self) -> list[str]:
        start = self.state.page * RESULTS_PER_PAGE
        return list(self.state.results[start:start + RESULTS_PER_PAGE])

    def _page_buttons(self) -> list[str]:
        buttons = []
        if self.state.page > 0:
            buttons.append("prev")
        if (self.state.page + 1) * RESULTS_PER_PAGE < len(self.state.results):
            buttons.append("next")
        return buttons + ["back"]

    def _render_results(self) -> str:
        state = self.state
        if not state.results:
            return f"no results for '{' '.join(state.query)}'. try other words."
        pages = (len(state.results) + RESULTS_PER_PAGE - 1) // RESULTS_PER_PAGE
        lines = [f"results for '{' '.join(state.query)}' (page {state.page + 1}/{pages}):"]
        for pid in self._visible():
            product = self.catalog.by_id[pid]
            lines.append(f"{pid}: {product.title} ${product.price:.2f}")
        return "\n".join(lines)

    def _render_product(self) -> str:
        product = self.catalog.by_id[self.state.product_id]
        lines = [f"{product.id}: {product.title} ${product.price:.2f}",
                 f"features: {', '.join(product.attributes)}"]
        lines += [f"{kind}: {', '.join(values)}" for kind, values in product.options.items()]
        return "\n".join(lines)

    def _info(self, valid: bool, feedback: str = "", won: bool = False, score: float = 0.0) -> dict[str, Any]:
        return {"valid": valid, "won": won, "score": score,
                "admissible": self.admissible_actions(), "feedback": feedback}
