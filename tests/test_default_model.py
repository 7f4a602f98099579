"""The embedded default model loads with no arguments and writes recognisable text."""

import mixjax


def test_default_model_generates_text():
    llm = mixjax.LLM(progress=False)
    assert llm.tokenizer is not None and llm.tokenizer.chat_template
    counted = llm.generate("Max counted: one, two,", max_new_tokens=12)[0]
    assert counted.startswith(" three, four")
    story = llm.generate("Once upon a time", max_new_tokens=30)[0]
    assert " went to the " in story and story.count(".") >= 2
