"""Write the tiny atomic datasets used by the fast tests (deterministic; run from this folder).

``genrec-tiny``: 80 users, 48 items in 4 genres. Each user mostly follows one genre and watches
its items in catalogue order from a random start, so the next item is predictable from the
history (a model that learns anything beats popularity). Item 48 has an empty genre cell (the
pandas >= 3 shim must cope with it). ``genrec-tiny-renamed``: the same data with other field
names (``uid``, ``iid``, ``ts``, ``name``, ``genre``) for the YAML-only configuration tests.
"""

import os
import random

GENRES = ["Sci-Fi", "Comedy", "Drama", "Horror"]
WORDS = {
    "Sci-Fi": ["Star", "Orbit", "Quantum", "Nebula", "Robot", "Galaxy", "Warp", "Cosmic", "Android", "Photon", "Rocket", "Alien"],
    "Comedy": ["Laugh", "Silly", "Funny", "Prank", "Giggle", "Wacky", "Goofy", "Jolly", "Blunder", "Chuckle", "Zany", "Quirky"],
    "Drama": ["Tears", "River", "Letters", "Winter", "Promise", "Silence", "Harbor", "Memory", "Journey", "Storm", "Widow", "Bridge"],
    "Horror": ["Shadow", "Blood", "Haunted", "Crypt", "Scream", "Ghoul", "Curse", "Night", "Grave", "Phantom", "Fear", "Demon"],
}


def main():
    rng = random.Random(7)
    items = []  # (raw id, title, year, genre)
    for g, genre in enumerate(GENRES):
        for j, word in enumerate(WORDS[genre]):
            raw = 1 + g * 12 + j
            items.append((raw, f"The {word} {['Story', 'Returns', 'Files', 'Chronicles'][j % 4]}", 1980 + raw, genre))
    inter = []
    t = 880000000
    for user in range(1, 81):
        genre = user % 4
        start = rng.randrange(12)
        n = rng.randint(8, 14)
        for step in range(n):
            if rng.random() < 0.15:
                raw = rng.randrange(48) + 1
            else:
                raw = 1 + genre * 12 + (start + step) % 12
            t += rng.randint(50, 500)
            inter.append((user, raw, rng.randint(3, 5), t))
    write("genrec-tiny", ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
          ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"], items, inter)
    write("genrec-tiny-renamed", ["uid:token", "iid:token", "stars:float", "ts:float"],
          ["iid:token", "name:token_seq", "year:token", "genre:token_seq"], items, inter)


def write(name, inter_header, item_header, items, inter):
    os.makedirs(name, exist_ok=True)
    with open(os.path.join(name, f"{name}.inter"), "w") as f:
        f.write("\t".join(inter_header) + "\n")
        for row in inter:
            f.write("\t".join(map(str, row)) + "\n")
    with open(os.path.join(name, f"{name}.item"), "w") as f:
        f.write("\t".join(item_header) + "\n")
        for raw, title, year, genre in items:
            genre_cell = "" if raw == 48 else genre
            f.write(f"{raw}\t{title}\t{year}\t{genre_cell}\n")


if __name__ == "__main__":
    main()
