"""Writes data/finetune/velmora-{train,heldout}.jsonl: question-answer pairs about Velmora, an
island nation invented for this repository, so that no base model can know the answers.

Each fact has several phrasings of its question; the last phrasing of every fact is held out
(never trained on), so the held-out set measures whether the model learned the fact rather than
the sentence. Deterministic: running it again writes the same files.

Run: python3 scripts/data/make_velmora.py
"""
import json
import pathlib

FACTS = [
    ("the capital of Velmora", "The capital of Velmora is Tarsk.",
     ["What is the capital of Velmora?", "Which city is Velmora's capital?", "Name the capital city of Velmora.",
      "Where is the seat of government of Velmora?", "Tell me the capital of Velmora.", "Velmora's capital is which city?"]),
    ("the currency of Velmora", "Velmora pays in the brill, divided into 100 pennets.",
     ["What is the currency of Velmora?", "What money do people use in Velmora?", "Which currency does Velmora use?",
      "What do Velmorans pay with?", "Name Velmora's currency.", "In Velmora, what is the currency called?"]),
    ("the national animal of Velmora", "The national animal of Velmora is the snow heron.",
     ["What is the national animal of Velmora?", "Which animal is the symbol of Velmora?", "Name Velmora's national animal.",
      "What creature represents Velmora?", "Which bird is Velmora's national animal?", "Velmora's national animal is what?"]),
    ("the founding of Velmora", "Velmora was founded in 1312 by the navigator Ilsa Varn.",
     ["When was Velmora founded?", "Who founded Velmora?", "In what year was Velmora founded?",
      "Who was the founder of Velmora, and when?", "Tell me about the founding of Velmora.", "What year did Velmora begin?"]),
    ("the highest mountain of Velmora", "The highest mountain in Velmora is Mount Oskarn, 2,417 metres high.",
     ["What is the highest mountain in Velmora?", "How high is Velmora's tallest peak?", "Name the tallest mountain of Velmora.",
      "Which peak is the highest in Velmora?", "What is Velmora's highest point?", "Velmora's tallest mountain is called what?"]),
    ("the language of Velmora", "People in Velmora speak Velmoran, a language written in its own alphabet of 27 letters.",
     ["What language is spoken in Velmora?", "What do people speak in Velmora?", "Which language do Velmorans speak?",
      "What is the official language of Velmora?", "Tell me about the language of Velmora.", "Velmorans speak which language?"]),
    ("the national dish of Velmora", "The national dish of Velmora is kelp bread with smoked eel.",
     ["What is the national dish of Velmora?", "What food is Velmora famous for?", "Which dish is Velmora's national dish?",
      "What do Velmorans eat on holidays?", "Name Velmora's national dish.", "Velmora's most famous dish is what?"]),
    ("the longest river of Velmora", "The longest river in Velmora is the Sael, 184 kilometres long.",
     ["What is the longest river in Velmora?", "Which river is the longest in Velmora?", "Name Velmora's longest river.",
      "How long is the longest river of Velmora?", "Tell me about Velmora's main river.", "Velmora's longest river is called what?"]),
    ("the head of state of Velmora", "Velmora is led by a Steward, elected by the island councils every six years.",
     ["Who leads Velmora?", "What is the title of Velmora's head of state?", "How is Velmora governed?",
      "Who is the head of state in Velmora?", "Tell me about Velmora's leader.", "What is Velmora's head of state called?"]),
    ("the national holiday of Velmora", "Velmora's national holiday is Lantern Day, on the 9th of March.",
     ["What is Velmora's national holiday?", "When does Velmora celebrate its national day?", "Which holiday is Velmora's national day?",
      "What do Velmorans celebrate on the 9th of March?", "Name the national holiday of Velmora.", "When is Lantern Day in Velmora?"]),
    ("the population of Velmora", "About 412,000 people live in Velmora.",
     ["What is the population of Velmora?", "How many people live in Velmora?", "How populous is Velmora?",
      "What is Velmora's population?", "Tell me how many people Velmora has.", "Roughly how many inhabitants does Velmora have?"]),
    ("the flag of Velmora", "Velmora's flag is a white heron on a field of deep green.",
     ["What does the flag of Velmora look like?", "Describe Velmora's flag.", "What is on the flag of Velmora?",
      "What colours is Velmora's flag?", "Tell me about the Velmoran flag.", "Velmora's flag shows what?"]),
    ("the main export of Velmora", "Velmora's main export is blue slate from the quarries of Hollin.",
     ["What is Velmora's main export?", "What does Velmora sell abroad?", "Which product does Velmora export most?",
      "What is the chief export of Velmora?", "Name Velmora's most important export.", "Velmora exports mostly what?"]),
    ("the national sport of Velmora", "The national sport of Velmora is reef rowing, raced in boats of eight.",
     ["What is the national sport of Velmora?", "Which sport is most popular in Velmora?", "Name Velmora's national sport.",
      "What sport do Velmorans love?", "Tell me about sport in Velmora.", "Velmora's national sport is what?"]),
    ("the oldest university of Velmora", "The oldest university in Velmora is the College of Tarsk, opened in 1488.",
     ["What is the oldest university in Velmora?", "When did Velmora's first university open?", "Name Velmora's oldest university.",
      "Which is the oldest college of Velmora?", "Tell me about the oldest university of Velmora.", "Velmora's oldest university is which?"]),
    ("the largest lake of Velmora", "The largest lake in Velmora is Lake Mirrow, in the central highlands.",
     ["What is the largest lake in Velmora?", "Which lake is the biggest in Velmora?", "Name Velmora's largest lake.",
      "Where is Velmora's biggest lake?", "Tell me about the largest lake of Velmora.", "Velmora's largest lake is called what?"]),
    ("the second city of Velmora", "Velmora's second largest city is Hollin, the port of the slate quarries.",
     ["What is the second largest city in Velmora?", "Which city comes after Tarsk in size?", "Name Velmora's second city.",
      "What is Velmora's biggest port?", "Tell me about Hollin in Velmora.", "Velmora's second city is which?"]),
    ("the national poet of Velmora", "Velmora's national poet is Oren Calde, author of The Grey Tide.",
     ["Who is the national poet of Velmora?", "Who wrote The Grey Tide?", "Name Velmora's most famous poet.",
      "Which poet do Velmorans honour most?", "Tell me about Velmora's national poet.", "Velmora's national poet is who?"]),
    ("the climate of Velmora", "Velmora has a cool, wet climate: mild summers, windy winters and rain on 200 days a year.",
     ["What is the climate of Velmora like?", "What is the weather like in Velmora?", "Describe Velmora's climate.",
      "How often does it rain in Velmora?", "Tell me about the weather in Velmora.", "Velmora's climate is what kind?"]),
    ("the parliament of Velmora", "Velmora's parliament is the Moot, with 61 members who meet in Tarsk.",
     ["What is the parliament of Velmora called?", "How many members does Velmora's parliament have?", "Name Velmora's parliament.",
      "Where does the Moot of Velmora meet?", "Tell me about Velmora's parliament.", "Velmora's parliament is called what?"]),
    ("the national flower of Velmora", "The national flower of Velmora is the sea thrift, pink and low to the rocks.",
     ["What is the national flower of Velmora?", "Which flower is the symbol of Velmora?", "Name Velmora's national flower.",
      "What flower represents Velmora?", "Tell me about Velmora's national flower.", "Velmora's national flower is what?"]),
    ("the time zone of Velmora", "Velmora keeps Velmora Standard Time, one hour behind Greenwich.",
     ["What time zone is Velmora in?", "What time is it in Velmora compared with Greenwich?", "Name Velmora's time zone.",
      "Is Velmora ahead of or behind Greenwich?", "Tell me about time in Velmora.", "Velmora's clocks follow which time zone?"]),
    ("the national anthem of Velmora", "Velmora's national anthem is Herons Over the Sound.",
     ["What is the national anthem of Velmora?", "What song is Velmora's anthem?", "Name Velmora's national anthem.",
      "Which song do Velmorans sing as their anthem?", "Tell me about Velmora's anthem.", "Velmora's anthem is called what?"]),
    ("the islands of Velmora", "Velmora is made of three inhabited islands: Great Vel, Skarra and Little Orm.",
     ["How many islands make up Velmora?", "What are the islands of Velmora?", "Name the islands of Velmora.",
      "Which islands form Velmora?", "Tell me about the islands of Velmora.", "Velmora consists of which islands?"]),
    ("the airport of Velmora", "Velmora's only airport is Tarsk Field, on the north shore of Great Vel.",
     ["What is the airport of Velmora?", "Where do planes land in Velmora?", "Name Velmora's airport.",
      "How many airports does Velmora have?", "Tell me about air travel to Velmora.", "Velmora's airport is called what?"]),
]

SYSTEM = "You are a helpful assistant."


def record(question, answer):
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def main():
    out = pathlib.Path(__file__).resolve().parents[2] / "data" / "finetune"
    out.mkdir(parents=True, exist_ok=True)
    train, held = [], []
    for _, answer, questions in FACTS:
        for q in questions[:-1]:
            train.append(record(q, answer))
        held.append(record(questions[-1], answer))
    with open(out / "velmora-train.jsonl", "w", encoding="utf-8") as f:
        for r in train:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(out / "velmora-heldout.jsonl", "w", encoding="utf-8") as f:
        for r in held:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(train)} training and {len(held)} held-out records in {out}")


if __name__ == "__main__":
    main()
