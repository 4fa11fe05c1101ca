"""A data folder's moca_prompts.json: what it overrides, and each way it can be wrong refused in one line that
names the file, the key and the problem."""

import json

import pytest

from megatron_moca.errors import UserError
from megatron_moca.eval.retrieval import Prompts, check_template, dataset_prompts


def test_dataset_prompts_override_the_task_default(tmp_path):
    default = Prompts(document="D: {text}")
    assert dataset_prompts(str(tmp_path), default) is default  # no file: the default as it is
    (tmp_path / "moca_prompts.json").write_text(json.dumps({"query": "Q: {text}"}))
    assert dataset_prompts(str(tmp_path), default) == Prompts(query="Q: {text}", document="D: {text}")
    (tmp_path / "moca_prompts.json").write_text(json.dumps({"query": "Q: {text}", "image_document": "<img> page"}))
    assert dataset_prompts(str(tmp_path), default) == Prompts("Q: {text}", "D: {text}", "<img> page")


@pytest.mark.parametrize("content", [
    ["Q: {text}"],  # not an object
    {"queries": "Q: {text}"},  # a key Prompts lacks
    {"query": "Q: {text}", "documents": "D"},  # one good key, one bad
    {"query": 3},  # not a string
    {"query": "Q: {text}", "document": None},  # one good value, one bad
])
def test_a_prompts_file_of_the_wrong_shape_is_refused(content, tmp_path):
    (tmp_path / "moca_prompts.json").write_text(json.dumps(content))
    with pytest.raises(UserError) as err:
        dataset_prompts(str(tmp_path), Prompts())
    assert str(err.value) == (f"{tmp_path / 'moca_prompts.json'}: expected an object of strings with keys among "
                              "['document', 'image_document', 'query']")


def test_a_template_naming_another_field_is_refused_in_the_folder(tmp_path):
    (tmp_path / "moca_prompts.json").write_text(json.dumps({"document": "{text}", "query": "{lang}: {text} {x}"}))
    with pytest.raises(UserError) as err:
        dataset_prompts(str(tmp_path), Prompts())
    assert str(err.value) == (f"{tmp_path / 'moca_prompts.json'}: query: unknown field(s) ['lang', 'x'] in "
                              "'{lang}: {text} {x}'; templates may use only {text}")


@pytest.mark.parametrize("template", ["{text}", "Q: {text} and {text}", "no field at all", "{{text}} is literal"])
def test_templates_of_text_alone_pass(template):
    check_template(template, "w")


def test_a_long_bad_template_is_shown_by_its_first_80_characters():
    template = "{text" + "x" * 200
    with pytest.raises(UserError) as err:
        check_template(template, "where")
    assert str(err.value).startswith("where: not a valid template (") and str(err.value).endswith(f"{template[:80]!r}")
    template = "{other}" + "y" * 200
    with pytest.raises(UserError) as err:
        check_template(template, "where")
    assert str(err.value) == f"where: unknown field(s) ['other'] in {template[:80]!r}; templates may use only {{text}}"
