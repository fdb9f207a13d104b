"""Small word lists the synthetic tasks draw from (written for this package; plain English words)."""

from __future__ import annotations

NOUNS = (
    "apple", "river", "table", "garden", "window", "pencil", "basket", "mountain", "bottle", "candle",
    "bridge", "castle", "cookie", "doctor", "engine", "feather", "guitar", "hammer", "island", "jacket",
    "kettle", "ladder", "mirror", "needle", "orange", "pillow", "rabbit", "saddle", "tunnel", "violin",
    "wagon", "button", "carpet", "dragon", "forest", "helmet", "lemon", "magnet", "planet", "rocket",
    "shovel", "tiger", "turtle", "wallet", "anchor", "blanket", "cherry", "desert", "finger", "goose",
)

VALUES = (
    "red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray",
    "gold", "silver", "round", "square", "tall", "short", "soft", "hard", "warm", "cold",
    "happy", "sad", "loud", "quiet", "fast", "slow", "big", "small", "old", "new",
)

NAMES = ("Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Max", "Lucy", "Tim", "Sara", "Jack", "Emma")

PLACES = ("park", "kitchen", "garden", "school", "beach", "forest", "bedroom", "shop", "farm", "lake")

CATEGORIES = {
    "animal": ("dog", "cat", "horse", "cow", "sheep", "lion", "bear", "mouse", "duck", "frog",
               "fox", "wolf", "pig", "goat", "owl", "bee"),
    "food": ("bread", "cake", "apple", "banana", "cheese", "soup", "rice", "egg", "pie", "milk",
             "candy", "pear", "grape", "carrot", "honey", "jam"),
    "color": ("red", "blue", "green", "yellow", "pink", "purple", "brown", "black", "white", "gray",
              "orange", "gold", "silver", "violet", "tan", "cyan"),
    "place": ("park", "house", "school", "beach", "forest", "shop", "farm", "lake", "city", "garden",
              "room", "town", "hill", "river", "castle", "zoo"),
}

SYMBOLS = ("foo", "bar", "baz", "qux", "zap", "mop")

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
