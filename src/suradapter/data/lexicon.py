"""Word lists and prompt builders of the shapes world: keyword prompts and narrative prompts.

A keyword prompt names count, colour and shape literally ("3 red circles, ..."). A narrative
prompt describes the same scene with everyday knowledge only ("a trio of fire-truck coloured
coins lying in the snow") and never uses a palette colour name or a shape word.
"""

from __future__ import annotations

import random

KEYWORD_SUFFIX = "white background, flat icon, centered, high quality"

SHAPE_PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}

# Adjective phrases that evoke a colour without naming it (several per colour).
COLOUR_OBJECTS: dict[str, tuple[str, ...]] = {
    "red": (
        "fire-truck coloured",
        "tomato-coloured",
        "ripe-strawberry coloured",
        "ladybug-coloured",
        "stop-sign coloured",
        "cherry-coloured",
    ),
    "green": (
        "grass-coloured",
        "fresh-lettuce coloured",
        "frog-coloured",
        "pea-pod coloured",
        "shamrock-coloured",
        "cucumber-skin coloured",
    ),
    "blue": (
        "clear-sky coloured",
        "sapphire-coloured",
        "denim-coloured",
        "cornflower-coloured",
        "deep-ocean coloured",
        "forget-me-not coloured",
    ),
    "yellow": (
        "banana-coloured",
        "egg-yolk coloured",
        "lemon-coloured",
        "sunflower-coloured",
        "school-bus coloured",
        "canary-coloured",
    ),
    "purple": (
        "grape-coloured",
        "plum-coloured",
        "eggplant-coloured",
        "amethyst-coloured",
        "lilac-bush coloured",
        "beetroot-coloured",
    ),
    "orange": (
        "pumpkin-coloured",
        "carrot-coloured",
        "tangerine-coloured",
        "traffic-cone coloured",
        "goldfish-coloured",
        "basketball-coloured",
    ),
}

# (singular, plural) everyday objects that have the shape seen flat from the front.
SHAPE_OBJECTS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (
        ("coin", "coins"),
        ("dinner plate", "dinner plates"),
        ("button", "buttons"),
        ("bottle cap", "bottle caps"),
        ("cookie", "cookies"),
        ("poker chip", "poker chips"),
    ),
    "square": (
        ("floor tile", "floor tiles"),
        ("cracker", "crackers"),
        ("sticky note", "sticky notes"),
        ("folded napkin", "folded napkins"),
        ("record sleeve", "record sleeves"),
        ("slice of sandwich cheese", "slices of sandwich cheese"),
    ),
    "triangle": (
        ("pizza slice", "pizza slices"),
        ("road-warning sign", "road-warning signs"),
        ("tortilla chip", "tortilla chips"),
        ("party hat", "party hats"),
        ("camping tent", "camping tents"),
        ("sailboat sail", "sailboat sails"),
    ),
}

ARTICLE = "<article>"  # placeholder: "a" or "an", chosen from the word that follows

COUNT_PHRASES: dict[int, tuple[str, ...]] = {
    1: (ARTICLE, "a single", "one lonely", "a lone", "just one"),
    2: ("a pair of", "two", "a couple of", "a duo of"),
    3: ("a trio of", "three", "a set of three", "three little"),
    4: ("four", "a foursome of"),
    5: ("five", "a handful of five"),
    6: ("six", "half a dozen"),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Narrative templates: {np} is the noun phrase, {be} is "is" or "are" to agree with it.
TEMPLATES: tuple[str, ...] = (
    "{np} lying in the snow",
    "there {be} {np} on the kitchen table",
    "a sticker sheet showing {np}",
    "{np} resting on a freshly painted wall",
    "my little sister found {np} at the beach",
    "{np} floating in a bowl of milk",
    "a museum display of {np}",
    "grandma kept {np} in her sewing box",
    "a close-up photo of {np} on a plain backdrop",
    "{np} {be} waiting on an empty page of a notebook",
    "somebody left {np} on a fresh sheet of paper",
    "a cartoon of {np}, nothing else in sight",
)


def check_colour(colour: str) -> str:
    """Return `colour` if the lexicon knows it. Raises ValueError naming an unknown colour."""
    if colour not in COLOUR_OBJECTS:
        raise ValueError(f"unknown colour {colour!r}; known: {', '.join(COLOUR_OBJECTS)}")
    return colour


def check_shape(shape: str) -> str:
    """Return `shape` if the lexicon knows it. Raises ValueError naming an unknown shape."""
    if shape not in SHAPE_OBJECTS:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPE_OBJECTS)}")
    return shape


def check_count(count: int) -> int:
    """Return `count` if it is a positive int. Raises ValueError otherwise."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"object count must be a positive int, got {count!r}")
    return count


def keyword_prompt(count: int, colour: str, shape: str) -> str:
    """Return the keyword prompt, e.g. '3 red circles, white background, flat icon, ...'."""
    noun = check_shape(shape) if check_count(count) == 1 else SHAPE_PLURALS[shape]
    return f"{count} {check_colour(colour)} {noun}, {KEYWORD_SUFFIX}"


def indefinite_article(word: str) -> str:
    """Return 'an' before a vowel sound (by first letter), else 'a'."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def count_phrases(count: int) -> tuple[str, ...]:
    """Return the phrases that can express `count` objects (ARTICLE marks a bare a/an)."""
    check_count(count)
    if count in COUNT_PHRASES:
        return COUNT_PHRASES[count]
    word = NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)
    return (word,)


def noun_phrase(count_phrase: str, colour_object: str, shape_object: str) -> str:
    """Return '<count phrase> <colour object> <shape object>', resolving a bare article."""
    if count_phrase == ARTICLE:
        count_phrase = indefinite_article(colour_object)
    return f"{count_phrase} {colour_object} {shape_object}"


def narrative_prompt(count: int, colour: str, shape: str, template: int, rng: random.Random) -> str:
    """Return a narrative prompt for the scene in template number `template`, words drawn by rng.

    Raises ValueError for an unknown colour or shape, a bad count or a template id out of range.
    """
    check_count(count)
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template id {template} out of range 0..{len(TEMPLATES) - 1}")
    colour_object = rng.choice(COLOUR_OBJECTS[check_colour(colour)])
    singular, plural = rng.choice(SHAPE_OBJECTS[check_shape(shape)])
    count_phrase = rng.choice(count_phrases(count))
    np_ = noun_phrase(count_phrase, colour_object, singular if count == 1 else plural)
    return TEMPLATES[template].format(np=np_, be="is" if count == 1 else "are")
