"""Chat patterns: the questions the user's chats ask of several people, asked again of every fact the notes state
the same way, and nothing where the notes or the chats are irregular."""

from mimo.train.note_patterns import chat_pattern_conversations, question_groups

PEOPLE = {"Ada": ("ramen", "Porto"), "Ben": ("sushi", "Oslo"), "Cleo Marsh": ("goulash", "Lima"),
          "Dan": ("pho", "Kyoto"), "Eve": ("tacos", "Graz")}
NOTES = ["# People\n" + "\n".join(f"{n}'s favourite dish is {food}. {n} lives in {city}." for n, (food, city) in
                                  PEOPLE.items()),
         "\n".join(f"Cooked {food} for {n}, who loves it." for n, (food, _) in PEOPLE.items())]


def chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def food_chat(name: str) -> list[dict]:
    return chat(f"What is {name}'s favourite food?", f"{name} loves {PEOPLE[name][0]}.")


def test_a_question_asked_of_several_people_is_asked_of_everyone_the_notes_state_it_for():
    chats = [food_chat("Ada"), food_chat("Ben"), chat("Where does Ada live?", "In Porto, by the sea.")]
    groups = question_groups([(c[0]["content"], c[1]["content"]) for c in chats])
    food = next(g for g in groups if g["question"] == "What is {K}'s favourite food?")
    assert food["answer"] == "{K} loves {V}." and food["seeds"] == {"Ada": "ramen", "Ben": "sushi"}
    new = chat_pattern_conversations(NOTES, chats)
    # the people the chats asked about are not asked again; a two-word key and its value come out whole; the city
    # was asked of one person only: one example cannot tell the answer's fixed words from its value
    assert sorted(map(str, new)) == sorted(map(str, [food_chat("Cleo Marsh"), food_chat("Dan"), food_chat("Eve")]))


def test_irregular_notes_or_one_example_give_nothing():
    chats = [food_chat("Ada"), food_chat("Ben")]
    assert chat_pattern_conversations(["Ada cooked ramen once. Ben likes sushi. Dan? Pho, I think."], chats) == []
    # only one chat agrees with each note sentence form
    one_each = ["Ada's favourite dish is ramen. Ben's best dish: sushi. Dan's favourite dish is pho."]
    assert chat_pattern_conversations(one_each, chats) == []
    assert chat_pattern_conversations(NOTES, [food_chat("Ada")]) == []
    assert chat_pattern_conversations(NOTES, []) == []
