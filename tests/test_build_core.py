"""The builder's pure core: buildpack references and choice, release YAML, .slugignore."""

from __future__ import annotations

import pytest

from flynnp2p.build.release_yaml import ReleaseError, parse_default_process_types
from flynnp2p.build.selection import (
    BuildpackRef,
    chosen_buildpacks,
    parse_buildpacks_file,
    parse_ref,
    process_types,
)
from flynnp2p.build.slugignore import SlugIgnore, parse_slugignore
from flynnp2p.errors import UserError


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("python", BuildpackRef("builtin", "python")),
        (" procfile ", BuildpackRef("builtin", "procfile")),
        ("/opt/bp/", BuildpackRef("path", "/opt/bp")),
        (
            "https://example.test/x/heroku-buildpack-go.git",
            BuildpackRef("git", "https://example.test/x/heroku-buildpack-go.git"),
        ),
        ("file:///srv/bp.git#v1.2", BuildpackRef("git", "file:///srv/bp.git", "v1.2")),
        (
            "git@example.test:o/bp.git#main",
            BuildpackRef("git", "git@example.test:o/bp.git", "main"),
        ),
    ],
)
def test_parse_ref_accepts(text: str, ref: BuildpackRef) -> None:
    assert parse_ref(text) == ref


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ruby",
        "relative/path",
        "ftp://x/bp",
        "/a/../etc",
        "https://x/bp#bad ref",
        "https://x/bp#-x",
        "-oProxyCommand=x",
    ],
)
def test_parse_ref_refuses_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(UserError) as e:
        parse_ref(text)
    assert (
        "expected" in e.value.message or "ref" in e.value.message or "absolute" in e.value.message
    )


def test_ref_names() -> None:
    assert parse_ref("https://h/o/heroku-buildpack-x.git").name == "heroku-buildpack-x"
    assert parse_ref("git@h:o/bp.git").name == "bp"
    assert parse_ref("/srv/my_bp").name == "my_bp"
    assert str(parse_ref("file:///r.git#abc")) == "file:///r.git#abc"


def test_buildpacks_file_in_order_with_comments_and_a_bad_line_named() -> None:
    refs = parse_buildpacks_file("# first\nfile:///a.git\n\n  python\n")
    assert refs == [BuildpackRef("git", "file:///a.git"), BuildpackRef("builtin", "python")]
    with pytest.raises(UserError, match="line 2"):
        parse_buildpacks_file("python\nnot a buildpack\n")
    with pytest.raises(UserError, match="at most 8"):
        parse_buildpacks_file("python\n" * 9)


def test_who_chooses_the_buildpacks() -> None:
    env = {"BUILDPACK_URL": "/opt/bp"}
    assert chosen_buildpacks(["static"], env, "python") == [BuildpackRef("builtin", "static")]
    assert chosen_buildpacks(None, env, "python") == [BuildpackRef("path", "/opt/bp")]
    assert chosen_buildpacks(None, {}, "python\nprocfile") == [
        BuildpackRef("builtin", "python"),
        BuildpackRef("builtin", "procfile"),
    ]
    assert chosen_buildpacks(None, {"BUILDPACK_URL": " "}, "# nothing\n") is None
    assert chosen_buildpacks([], {}, None) is None


def test_process_types_later_buildpacks_then_the_procfile_win() -> None:
    got = process_types([{"web": "a", "worker": "w"}, {"web": "b"}], {"web": "p", "clock": "c"})
    assert got == {"clock": "c", "web": "p", "worker": "w"}
    assert process_types([{"web": "a"}], None) == {"web": "a"}


HEROKU_STYLE = """---
addons: []
config_vars:
  LANG: en_US.UTF-8
  PATH: /app/bin:$PATH
default_process_types:
  web: gunicorn app:app --bind 0.0.0.0:$PORT   # the web
  worker: 'python worker.py --name ''w'''
  clock: "python -c \\"print(1)\\""
...
"""


def test_release_yaml_heroku_style() -> None:
    assert parse_default_process_types(HEROKU_STYLE) == {
        "web": "gunicorn app:app --bind 0.0.0.0:$PORT",
        "worker": "python worker.py --name 'w'",
        "clock": 'python -c "print(1)"',
    }


@pytest.mark.parametrize(
    "text",
    [
        "",
        "---\n",
        "default_process_types: {}\n",
        "addons: []\nconfig_vars: {}\n",
        "default_process_types:\n",
    ],
)
def test_release_yaml_without_types(text: str) -> None:
    assert parse_default_process_types(text) == {}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("default_process_types:\n  web:\n    nested: x\n", 2),
        ("default_process_types:\n  web: |\n    python app.py\n", 2),
        ("default_process_types:\n  web: 'unterminated\n", 2),
        ("default_process_types:\n  web: a\n  web: b\n", 3),
        ("default_process_types:\n  bad type: a\n", 2),
        ("default_process_types: {web: a}\n", 1),
        ("just text\n", 1),
        ("default_process_types:\n\tweb: a\n", 2),
    ],
)
def test_release_yaml_refusals_name_the_line(text: str, line: int) -> None:
    with pytest.raises(ReleaseError, match=f"line {line}"):
        parse_default_process_types(text)


SLUGIGNORE_CASES = [
    ("*.log", "x.log", False, True),
    ("*.log", "a/b/x.log", False, True),
    ("*.log", "x.logs", False, False),
    ("/docs", "docs", True, True),
    ("/docs", "src/docs", True, False),
    ("tests/", "src/tests", True, True),
    ("tests/", "tests", False, False),
    ("a/**/z.txt", "a/z.txt", False, True),
    ("a/**/z.txt", "a/b/c/z.txt", False, True),
    ("a/**/z.txt", "b/a/z.txt", False, False),
    ("f[0-9].txt", "f1.txt", False, True),
    ("f[!0-9].txt", "f1.txt", False, False),
    ("?.md", "a.md", False, True),
    ("?.md", "a/b.md", False, True),
    ("src/*.c", "src/a/b.c", False, False),
]


@pytest.mark.parametrize(("pattern", "path", "is_dir", "ignored"), SLUGIGNORE_CASES)
def test_slugignore_matching(pattern: str, path: str, is_dir: bool, ignored: bool) -> None:
    assert SlugIgnore([pattern]).ignores(path, is_dir=is_dir) is ignored


def test_slugignore_file() -> None:
    assert parse_slugignore("# c\n\n*.log\n /tmp/ \n") == ["*.log", "/tmp/"]
    with pytest.raises(UserError, match="line 1: negation"):
        parse_slugignore("!keep.log\n")
    with pytest.raises(UserError, match="whole app"):
        parse_slugignore("/\n")
