"""Writes the sentence sets the quantizer docs and tests use (run once; the output is committed).

xla_qops/data/calibration_sentences.txt (400) and evaluation_sentences.txt
(200): disjoint, generated from hand-written templates and word lists over
everyday topics, so that nothing is downloaded. Deterministic (seed 0).
"""

import pathlib
import random

SUBJECTS = ["The old fisherman", "My younger sister", "A quiet librarian", "The new manager",
            "Our neighbour's dog", "The small bakery", "A tired nurse", "The city council",
            "Every student", "The museum guide", "A curious child", "The delivery driver",
            "The orchestra", "A local farmer", "The research team", "My grandfather",
            "The football coach", "A street musician", "The hotel chef", "The park ranger"]
VERBS = ["repaired", "painted", "described", "forgot", "carried", "organised", "discovered",
         "cleaned", "photographed", "measured", "borrowed", "explained", "delivered", "sold",
         "tested", "planted", "cooked", "designed", "translated", "counted"]
OBJECTS = ["the wooden bridge", "a map of the coast", "the broken clock", "three baskets of apples",
           "the winter schedule", "an ancient coin", "the kitchen window", "a letter from abroad",
           "the blue bicycle", "the garden fence", "a recipe for bread", "the village church",
           "a box of old photographs", "the train timetable", "a pair of leather boots",
           "the school library", "a song about the sea", "the solar panels", "a jar of honey",
           "the mountain path"]
TIMES = ["before sunrise", "last Tuesday", "during the storm", "after the meeting",
         "in the late afternoon", "on a rainy weekend", "at the end of the summer",
         "while everyone slept", "in less than an hour", "for the third time this year"]
FACTS = ["Water boils at a lower temperature high in the mountains.",
         "Bees communicate the location of flowers by dancing.",
         "A leap year adds one day to February.",
         "Copper turns green when it is exposed to air for years.",
         "The heart pumps blood through thousands of kilometres of vessels.",
         "Light from the sun takes about eight minutes to reach the earth.",
         "Most of the planet's fresh water is frozen in ice sheets.",
         "Owls can turn their heads much further than people can.",
         "Bread rises because yeast produces carbon dioxide.",
         "A rainbow appears when sunlight is refracted by raindrops."]
TOPICS = ["weather", "travel", "cooking", "music", "sports", "science", "history", "gardening",
          "finance", "medicine", "computers", "architecture", "astronomy", "farming", "fashion"]
OPINIONS = ["I think {t} is more interesting than most people assume.",
            "Nobody at the table wanted to talk about {t} tonight.",
            "She wrote a short book about {t} for beginners.",
            "The radio programme about {t} starts at nine.",
            "We argued for hours about the future of {t}.",
            "His favourite magazine covers {t} every month.",
            "The course on {t} was cancelled because of low demand.",
            "Can you recommend a good podcast about {t}?"]
QUESTIONS = ["Where did you leave {o}?", "Who {v} {o} {time}?", "Why was {o} so expensive?",
             "How long will it take to fix {o}?"]


def sentences(rng):
    out = set()
    while len(out) < 620:
        kind = rng.random()
        s, v, o, t = (rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS),
                      rng.choice(TIMES))
        if kind < 0.5:
            out.add(f"{s} {v} {o} {t}.")
        elif kind < 0.7:
            out.add(rng.choice(OPINIONS).format(t=rng.choice(TOPICS)))
        elif kind < 0.85:
            out.add(rng.choice(QUESTIONS).format(o=o, v=v, time=t))
        elif kind < 0.95:
            out.add(f"{rng.choice(FACTS)} {s} {v} {o}.")
        else:
            out.add(rng.choice(FACTS))
    return sorted(out)


def main():
    rng = random.Random(0)
    all_sentences = sentences(rng)
    rng.shuffle(all_sentences)
    data = pathlib.Path(__file__).resolve().parent.parent / "xla_qops" / "data"
    data.mkdir(exist_ok=True)
    (data / "calibration_sentences.txt").write_text("\n".join(all_sentences[:400]) + "\n")
    (data / "evaluation_sentences.txt").write_text("\n".join(all_sentences[400:600]) + "\n")


if __name__ == "__main__":
    main()
