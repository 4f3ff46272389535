from dataset import pre_caption, pre_question


def test_caption_strips_listed_punctuation_and_extra_spaces():
    assert pre_caption('  a dog (brown); runs: "fast"!  \n') == "A dog brown runs fast"


def test_caption_keeps_at_most_30_words():
    words = " ".join(f"w{i}" for i in range(40))
    assert pre_caption(words).split() == ["W0"] + [f"w{i}" for i in range(1, 30)]


def test_caption_capitalises_like_the_official_code():
    # str.capitalize: first letter upper, the rest lower (official behaviour)
    assert pre_caption("the NEW York skyline.") == "The new york skyline"


def test_question_ends_with_one_question_mark():
    assert pre_question("what colour is the bus") == "What colour is the bus?"
    assert pre_question("Is it raining?") == "Is it raining?"
    assert pre_question("how many (dogs).") == "How many dogs?"
