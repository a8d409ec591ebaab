"""The synthetic task set the embedded default model is trained and judged on.

Each `TaskInstance` is a chat (OpenAI-style messages, optional tools, thinking on or off, an
optional image or audio clip) plus the exact text the model must answer. Train and held-out
instances come from disjoint value pools (cities, words, names, number pairs, colour shades,
tone frequencies), so the held-out score measures generalisation, not memory.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("add", "think", "copy", "reverse", "tool_call", "tool_answer", "json", "colour", "tone", "beeps")
SAMPLE_RATE = 16_000
IMAGE_SIZE = 64

_CITIES = (
    "Paris London Tokyo Berlin Madrid Rome Vienna Prague Warsaw Lisbon Dublin Oslo Helsinki Stockholm "
    "Copenhagen Amsterdam Brussels Zurich Geneva Munich Hamburg Milan Naples Athens Istanbul Cairo Nairobi "
    "Lagos Accra Dakar Casablanca Tunis Algiers Durban Mumbai Delhi Chennai Kolkata Bangalore Karachi "
    "Lahore Dhaka Colombo Kathmandu Bangkok Hanoi Manila Jakarta Singapore Seoul Busan Osaka Kyoto Beijing "
    "Shanghai Shenzhen Taipei Sydney Melbourne Perth Auckland Wellington Toronto Montreal Vancouver Chicago "
    "Boston Seattle Denver Austin Miami Atlanta Dallas Houston Phoenix Portland Detroit Lima Bogota Quito "
    "Santiago Montevideo Caracas Havana Reykjavik Tallinn Riga Vilnius Kyiv Minsk Sofia Bucharest Belgrade "
    "Zagreb Ljubljana Budapest Bratislava Krakow Gdansk Porto Seville Valencia Bilbao Lyon Marseille Nice "
    "Bordeaux Toulouse Lille Antwerp Rotterdam Utrecht Bergen Tampere Malmo Aarhus Edinburgh Glasgow Cardiff "
    "Belfast Manchester Liverpool Leeds Bristol Doha Dubai Riyadh Tehran Baghdad Amman Beirut Baku Tbilisi "
    "Yerevan Tashkent Almaty Hobart Darwin Adelaide Brisbane Calgary Ottawa Quebec Halifax Winnipeg "
    "Anchorage Honolulu Boise Omaha Tulsa Memphis Nashville Orlando Tampa"
).split()
_NAMES = (
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Leo Maria Nina Oscar Paula Quinn Rosa "
    "Sam Tina Umar Vera Walter Xena Yusuf Zoe Amir Bianca Carlos Dana Elena Felix Gina Hugo Ines Jonas "
    "Kira Luis Mona Nils Olga Pedro Rita Sven Tara Ugo Vito Wanda Yara Zack Anna Boris Clara Dmitri Eva"
).split()
COLOURS = {  # name -> RGB centre; held-out images use other shades of the same colours
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 220, 40),
    "black": (15, 15, 15), "white": (240, 240, 240), "orange": (245, 140, 20), "purple": (140, 40, 170),
}
_CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy")
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
            },
            "required": ["location"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "description": "The city name"}},
            "required": ["location"],
        },
    },
}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class TaskInstance:
    """One chat and the exact answer greedy decoding must produce."""

    kind: str
    messages: tuple[dict[str, Any], ...]
    answer: str  # the model's visible content
    thinking: str | None = None  # the thought channel's text, when thinking is enabled
    tool_call: ToolCall | None = None  # the call the model must make instead of answering
    tools: tuple[dict[str, Any], ...] = ()
    enable_thinking: bool = False
    image: np.ndarray | None = None  # HxWx3 uint8
    audio: np.ndarray | None = None  # float32 mono at SAMPLE_RATE


def in_heldout(value: str) -> bool:
    """A fixed fifth of every value pool is kept out of training."""
    return hashlib.sha1(value.encode()).digest()[0] % 5 == 0


def _pool(values: list[str], heldout: bool) -> list[str]:
    return [v for v in values if in_heldout(v) == heldout]


def _word(rng: random.Random) -> str:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    return "".join(rng.choice(syllables) for _ in range(rng.randint(2, 3)))


def _fresh_word(rng: random.Random, heldout: bool) -> str:
    while True:
        w = _word(rng)
        if in_heldout(w) == heldout:
            return w


_ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kl", "l", "m", "n", "p", "pr",
           "qu", "r", "s", "sh", "st", "t", "tr", "v", "w", "y", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")
_CODAS = ("", "", "n", "r", "s", "l", "m", "nd", "rt", "x")


def _invented_name(rng: random.Random) -> str:
    """A capitalised made-up proper noun, sometimes two words: training material for copying
    names the model has never seen (held-out cities and people are real but unseen)."""
    def one() -> str:
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(rng.randint(1, 3))).capitalize()
    return one() if rng.random() < 0.8 else f"{one()} {one()}"


def _proper_noun(rng: random.Random, pool: list[str], heldout: bool) -> str:
    if not heldout and rng.random() < 0.5:
        return _invented_name(rng)
    return rng.choice(_pool(pool, heldout))


def _number_pair(rng: random.Random, heldout: bool) -> tuple[int, int]:
    while True:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if in_heldout(f"{a}+{b}") == heldout:
            return a, b


def _user(text: str, media: str | None = None) -> dict[str, Any]:
    if media is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": media}, {"type": "text", "text": text}]}


def make_instance(kind: str, rng: random.Random, heldout: bool) -> TaskInstance:
    """Draw one instance of a task kind from the train or held-out pools."""
    if kind in ("add", "think"):
        a, b = _number_pair(rng, heldout)
        question = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."]).format(a=a, b=b)
        thinking = f"{a} + {b} = {a + b}." if kind == "think" else None
        return TaskInstance(kind, (_user(question),), str(a + b), thinking=thinking, enable_thinking=kind == "think")
    if kind in ("copy", "reverse"):
        words = [_fresh_word(rng, heldout) for _ in range(rng.randint(2, 5))]
        verb = "Repeat" if kind == "copy" else "Reverse the order of"
        answer = words if kind == "copy" else words[::-1]
        return TaskInstance(kind, (_user(f"{verb} these words: {' '.join(words)}"),), " ".join(answer))
    if kind in ("tool_call", "tool_answer"):
        return _tool_instance(kind, rng, heldout)
    if kind == "json":
        name = _proper_noun(rng, _NAMES, heldout)
        city = _proper_noun(rng, _CITIES, heldout)
        age = rng.randint(18, 90)
        text = f"{name} is {age} years old and lives in {city}."
        answer = json.dumps({"name": name, "age": age, "city": city})
        return TaskInstance(kind, (_user(f"Extract name, age and city as JSON: {text}"),), answer)
    if kind == "colour":
        colour = rng.choice(sorted(COLOURS))
        return TaskInstance(kind, (_user("What is the main colour of this image?", "image"),), colour,
                            image=solid_image(colour, rng, heldout))
    if kind == "tone":
        high = rng.random() < 0.5
        return TaskInstance(kind, (_user("Is the tone high or low?", "audio"),), "high" if high else "low",
                            audio=tone_clip(high, rng, heldout))
    if kind == "beeps":
        count = rng.randint(1, 4)
        return TaskInstance(kind, (_user("How many beeps are there?", "audio"),), str(count),
                            audio=beep_clip(count, rng, heldout))
    raise ValueError(f"unknown task kind {kind!r}")


def _tool_instance(kind: str, rng: random.Random, heldout: bool) -> TaskInstance:
    city = _proper_noun(rng, _CITIES, heldout)
    wants_time = rng.random() < 0.25
    tools = (WEATHER_TOOL, TIME_TOOL)
    if wants_time:
        question = rng.choice(["What time is it in {c}?", "Tell me the local time in {c}."]).format(c=city)
        call = ToolCall("get_time", {"location": city})
    else:
        question = rng.choice(["What's the weather in {c}?", "What is the weather in {c} today?",
                               "How is the weather in {c}?"]).format(c=city)
        call = ToolCall("get_weather", {"location": city})
    if kind == "tool_call":
        return TaskInstance(kind, (_user(question),), "", tool_call=call, tools=tools)
    if wants_time:
        hour, minute = rng.randint(0, 23), rng.randint(0, 59)
        result = {"time": f"{hour:02d}:{minute:02d}"}
        answer = f"It is {hour:02d}:{minute:02d} in {city}."
    else:
        temp, cond = rng.randint(-10, 40), rng.choice(_CONDITIONS)
        result = {"temperature": temp, "condition": cond, "unit": "celsius"}
        answer = f"It is {cond} and {temp} degrees in {city}."
    # The published template wants arguments as a mapping (a JSON string makes it raise).
    call_msg = {"role": "assistant", "tool_calls": [{"id": "call_0", "type": "function", "function": {
        "name": call.name, "arguments": dict(call.arguments)}}]}
    tool_msg = {"role": "tool", "tool_call_id": "call_0", "name": call.name, "content": json.dumps(result)}
    return TaskInstance(kind, (_user(question), call_msg, tool_msg), answer, tools=tools)


def solid_image(colour: str, rng: random.Random, heldout: bool) -> np.ndarray:
    """A square of one colour with noise; held-out shades differ from training ones."""
    centre = np.array(COLOURS[colour], dtype=np.float32)
    while True:
        shift = np.array([rng.uniform(-25, 25) for _ in range(3)], dtype=np.float32)
        if in_heldout(",".join(f"{int(s) // 5}" for s in shift)) == heldout:
            break
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 12, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(centre + shift + noise, 0, 255).astype(np.uint8)


def _frequency(rng: random.Random, lo: float, hi: float, heldout: bool) -> float:
    while True:
        f = rng.uniform(lo, hi)
        if in_heldout(str(int(f) // 10)) == heldout:
            return f


def tone_clip(high: bool, rng: random.Random, heldout: bool) -> np.ndarray:
    """One second of a sine tone: high 1.5-3 kHz, low 150-400 Hz."""
    freq = _frequency(rng, 1500, 3000, heldout) if high else _frequency(rng, 150, 400, heldout)
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def beep_clip(count: int, rng: random.Random, heldout: bool) -> np.ndarray:
    """Two seconds holding `count` short beeps separated by silence."""
    freq = _frequency(rng, 600, 1200, heldout)
    clip = np.zeros(2 * SAMPLE_RATE, dtype=np.float32)
    slot = len(clip) // 4
    beep = int(0.15 * SAMPLE_RATE)
    t = np.arange(beep) / SAMPLE_RATE
    for i in range(count):
        start = i * slot + rng.randint(0, slot - beep)
        clip[start:start + beep] = 0.5 * np.sin(2 * np.pi * freq * t)
    return clip


def make_set(seed: int, count: int, heldout: bool, kinds: tuple[str, ...] = KINDS) -> list[TaskInstance]:
    """`count` instances cycling through `kinds`, reproducible from `seed`."""
    rng = random.Random(seed)
    return [make_instance(kinds[i % len(kinds)], rng, heldout) for i in range(count)]
