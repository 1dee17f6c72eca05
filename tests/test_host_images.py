"""Images: the config rules, the archive reader (hostile members too) and a job in a rootfs.

The archives are made in Python (`tests.image_archives`) in the layout ``docker
save`` writes; no engine is needed. The last test runs a real busybox in a
chroot with the process backend, as root (skipped otherwise).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flynnp2p.host.backend import ImageRoot
from flynnp2p.host.containers import container_args, spec_from_container
from flynnp2p.host.image import ImageConfig, ImageConfigError, image_config, web_process
from flynnp2p.host.imagearchive import (
    ArchiveError,
    Entry,
    Member,
    member_path,
    parse_manifest,
    plan_layer,
)
from flynnp2p.host.process import app_uid, open_process_backend
from flynnp2p.host.rootfs import apply_layers, read_archive, unpack_image
from tests.image_archives import Spec, config_doc, save_archive
from tests.test_host_process import spec as job_spec
from tests.test_host_process import texts

# -- the image's config ---------------------------------------------------------------


def test_config_gives_argv_env_workdir_and_the_first_tcp_port() -> None:
    config = image_config(
        {
            "Entrypoint": ["/bin/tini", "--"],
            "Cmd": ["python", "-m", "http.server"],
            "Env": ["PATH=/usr/bin:/bin", "GREETING=a=b", "GREETING=later"],
            "WorkingDir": "/srv",
            "ExposedPorts": {"53/udp": {}, "8000/tcp": {}, "9000": {}},
        }
    )
    assert config.argv == ("/bin/tini", "--", "python", "-m", "http.server")
    assert config.env_map() == {"PATH": "/usr/bin:/bin", "GREETING": "later"}
    assert config.workdir == "/srv"
    assert config.ports == (8000, 9000) and config.port == 8000
    assert image_config(None) == ImageConfig()  # an image with no config runs nothing
    assert image_config({"WorkingDir": ""}).workdir == "/"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([], "must be an object"),
        ({"Cmd": "python app.py"}, "Cmd must be a list of strings"),
        ({"Entrypoint": [1]}, "Entrypoint must be a list"),
        ({"Env": ["JUSTANAME"]}, "not NAME=value"),
        ({"Env": ["=x"]}, "not NAME=value"),
        ({"WorkingDir": "srv"}, "absolute path"),
        ({"ExposedPorts": ["8000"]}, "ExposedPorts must be an object"),
        ({"ExposedPorts": {"http/tcp": {}}}, "is not PORT"),
        ({"ExposedPorts": {"70000/tcp": {}}}, "is not PORT"),
    ],
)
def test_bad_configs_are_refused_with_what_is_wrong(config: object, message: str) -> None:
    with pytest.raises(ImageConfigError, match=message) as info:
        image_config(config)
    assert info.value.status == 400


def test_the_web_process_is_the_images_argv_and_port() -> None:
    web = web_process(
        image_config({"Cmd": ["sh", "-c", "echo $PORT"], "ExposedPorts": {"80/tcp": {}}}), "x"
    )
    assert web.command == "sh -c 'echo $PORT'" and web.ports == (80,)
    assert web_process(image_config({"Cmd": ["run"]}), "x").ports == (0,)  # $PORT, the host's
    with pytest.raises(ImageConfigError, match="image shop:1 has neither ENTRYPOINT nor CMD"):
        web_process(ImageConfig(), "image shop:1")


# -- manifest and layer plans (pure) -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "path"),
    [("./bin/sh", "bin/sh"), ("bin//sh/", "bin/sh"), (".", ""), ("./", ""), ("a/./b", "a/b")],
)
def test_member_names_are_normalised(name: str, path: str) -> None:
    assert member_path(name) == path


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "a/..", "a\0b"])
def test_unsafe_member_names_are_refused(name: str) -> None:
    with pytest.raises(ArchiveError, match="refused|NUL"):
        member_path(name)


def test_a_layer_plan_deletes_first_then_writes_in_order() -> None:
    plan = plan_layer(
        [
            Member("etc/", "dir", 0o755),
            Member("etc/app.conf", "file", 0o4755),  # setuid: dropped
            Member("etc/.wh.old.conf", "file"),
            Member("var/cache/.wh..wh..opq", "file"),
            Member(".wh..wh.plnk", "dir"),  # aufs bookkeeping
            Member("dev/null", "other"),
            Member("bin/sh", "symlink", linkname="/bin/busybox"),
            Member("bin/ash", "hardlink", linkname="./bin/busybox"),
            Member(".", "dir", 0o755),
        ]
    )
    assert plan.opaque == ("var/cache",)
    assert plan.deletions == ("etc/old.conf",)
    assert plan.skipped == ("dev/null",)
    assert plan.entries == (
        Entry(0, "etc", "dir", 0o755),
        Entry(1, "etc/app.conf", "file", 0o755),
        Entry(6, "bin/sh", "symlink", 0o777, "/bin/busybox"),
        Entry(7, "bin/ash", "hardlink", 0, "bin/busybox"),
        Entry(8, "", "dir", 0o755),
    )


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (Member("etc/.wh...", "file"), "names no file"),
        (Member(".wh.", "file"), "names no file"),
        (Member("bin/x", "hardlink", linkname="../../etc/shadow"), "climbs out"),
        (Member("bin/x", "hardlink", linkname="/etc/shadow"), "absolute"),
        (Member("bin/x", "hardlink", linkname="."), "points at the root"),
        (Member("bin/x", "symlink", linkname=""), "no usable target"),
        (Member("./", "file"), "would replace the root"),
    ],
)
def test_hostile_layer_members_are_refused(member: Member, message: str) -> None:
    with pytest.raises(ArchiveError, match=message):
        plan_layer([member])


def test_manifest_of_one_image() -> None:
    m = parse_manifest(
        b'[{"Config": "c.json", "RepoTags": ["a:1"], "Layers": ["./l1/layer.tar", "l2"]}]'
    )
    assert (m.config, m.layers, m.tags) == ("c.json", ("l1/layer.tar", "l2"), ("a:1",))
    for data, message in [
        (b"{", "not JSON"),
        (b"{}", "must be a list"),
        (b"[]", "must be a list"),
        (b'[{"Config": "a", "Layers": []}, {"Config": "b", "Layers": []}]', "holds 2 images"),
        (b'[{"Layers": []}]', "Config must name"),
        (b'[{"Config": "c", "Layers": "l"}]', "Layers must be a list"),
        (b'[{"Config": "../c", "Layers": []}]', "climbs out"),
    ]:
        with pytest.raises(ArchiveError, match=message):
            parse_manifest(data)


# -- archives on disk -------------------------------------------------------------------


def tree(root: Path) -> dict[str, str]:
    """Every path under `root`: its kind, a link's target or a file's content."""
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(base, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes().decode("latin-1")
    return out


LAYERS: list[list[Spec]] = [
    [
        ("bin", "dir", b"", 0o755),
        ("bin/busybox", "file", b"BB", 0o4755),
        ("bin/sh", "symlink", "busybox", 0o777),
        ("etc", "dir", b"", 0o755),
        ("etc/old.conf", "file", b"old", 0o644),
        ("var/cache/a", "file", b"a", 0o644),  # no parent dirs in the layer: made
        ("tmp", "symlink", "/etc", 0o777),  # replaced by a real directory
        ("dev/null", "chr", b"", 0o666),  # skipped
    ],
    [
        ("etc/.wh.old.conf", "file", b"", 0o644),
        ("etc/new.conf", "file", b"new", 0o600),
        ("var/cache/.wh..wh..opq", "file", b"", 0o644),
        ("var/cache/b", "file", b"b", 0o644),
        ("bin/ash", "hardlink", "bin/busybox", 0o755),
    ],
    [("etc/new.conf", "file", b"newer", 0o644), ("bin/sh", "file", b"not a link now", 0o755)],
]


def test_layers_are_applied_in_order_with_whiteouts(tmp_path: Path) -> None:
    config = config_doc(Cmd=["/bin/sh"], Env=["A=1"], ExposedPorts={"8080/tcp": {}})
    archive = save_archive(tmp_path / "img.tar", LAYERS, config)
    info = read_archive(archive)
    assert info.image_id == "sha256:" + hashlib.sha256(config).hexdigest()
    assert info.config.port == 8080 and info.manifest.tags == ("test:1",)
    root = tmp_path / "root"
    root.mkdir()
    apply_layers(archive, root)
    assert tree(root) == {
        "bin": "dir", "etc": "dir", "var": "dir", "var/cache": "dir", "tmp": "dir", "dev": "dir",
        "proc": "dir", "bin/busybox": "BB", "bin/ash": "BB", "bin/sh": "not a link now",
        "etc/new.conf": "newer", "var/cache/b": "b",
    }  # fmt: skip
    assert stat.S_IMODE((root / "bin/busybox").stat().st_mode) == 0o755  # no setuid
    assert (root / "bin/ash").stat().st_ino == (root / "bin/busybox").stat().st_ino


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (
            [[("etc", "symlink", "/outside", 0o777)], [("etc/passwd", "file", b"x", 0o644)]],
            "symlink 'etc'",
        ),
        (
            [[("etc", "symlink", "../outside", 0o777)], [("etc/.wh.x", "file", b"", 0o644)]],
            "symlink 'etc'",
        ),
        ([[("a", "file", b"", 0o644), ("a/b", "file", b"x", 0o644)]], "not a directory"),
        ([[("l", "symlink", "/", 0o777), ("x", "hardlink", "l/etc/passwd", 0o644)]], "symlink 'l'"),
        ([[("x", "hardlink", "missing", 0o644)]], "no file to link"),
    ],
)
def test_members_that_would_write_outside_the_root_are_refused(
    tmp_path: Path, layers: list[list[Spec]], message: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    archive = save_archive(tmp_path / "img.tar", layers)
    with pytest.raises(ArchiveError, match=message):
        apply_layers(archive, root)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a tar at all" * 100, "not a docker save archive"),
        (None, "no member 'manifest.json'"),
    ],
)
def test_what_is_not_a_docker_save_archive_is_refused(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "x.tar"
    if content is None:  # a tar, but not docker save's
        shutil.make_archive(str(tmp_path / "x"), "tar", root_dir=tmp_path, base_dir=".")
    else:
        path.write_bytes(content)
    with pytest.raises(ArchiveError, match=message) as info:
        read_archive(path)
    assert info.value.status == 400


def test_a_layer_the_manifest_names_must_be_there(tmp_path: Path) -> None:
    manifest = [{"Config": "c.json", "Layers": ["nope/layer.tar"]}]
    archive = save_archive(
        tmp_path / "img.tar", [], manifest=manifest, extra={"c.json": config_doc()}
    )
    with pytest.raises(ArchiveError, match="names layer 'nope/layer.tar', which it lacks"):
        read_archive(archive)


async def test_an_image_is_unpacked_once_per_digest(tmp_path: Path) -> None:
    archive = save_archive(tmp_path / "img.tar", LAYERS, config_doc(Cmd=["x"], WorkingDir="/w"))
    first = await unpack_image(archive, tmp_path / "host", "sha256:abc")
    assert (first.rootfs / "bin/busybox").read_bytes() == b"BB"
    archive.unlink()  # the second asks nothing of the archive
    again = await unpack_image(archive, tmp_path / "host", "sha256:abc")
    assert again == first and again.config.workdir == "/w"
    assert stat.S_IMODE(first.rootfs.parent.stat().st_mode) == 0o700  # root's alone
    with pytest.raises(ArchiveError, match="not valid"):
        await unpack_image(archive, tmp_path / "host", "../x")


# -- hostile archives: nothing is ever written outside the root --------------------------

_NAMES = st.sampled_from(
    ["a", "b", "a/b", "a/b/c", "..", "../x", "/abs", "a/../..", ".wh.a", "a/.wh.b", "a/.wh..wh..opq",
     ".wh..wh..opq", ".", "./a", "x/y", "outside", "../outside/pwn"]
)  # fmt: skip
# OUT stands for the absolute path of the directory beside the root that must stay as it is.
_TARGETS = st.sampled_from(["/", "..", "../..", "../outside", "OUT", "a", "a/b", "x", "."])


@st.composite
def _member(draw: st.DrawFn) -> Spec:
    kind = draw(st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo"]))
    name = draw(_NAMES)
    if draw(st.booleans()):
        name = f"{name}/{draw(_NAMES)}"
    if kind in ("symlink", "hardlink"):
        return (name, kind, draw(_TARGETS), 0o777)  # OUT is filled in per example
    return (name, kind, b"pwned", draw(st.sampled_from([0o644, 0o4755, 0o777])))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_member(), max_size=6), min_size=1, max_size=4))
@example([[("a", "symlink", "../outside", 0o777), ("a/b", "file", b"pwned", 0o644)]])
@example([[("a", "symlink", "OUT", 0o777)], [("a/.wh.keep", "file", b"", 0o644)]])
@example([[("x", "symlink", "..", 0o777), ("x/outside/b", "hardlink", "a", 0o777)]])
def test_hostile_layers_never_write_outside_the_root(layers: list[list[Spec]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        outside = base / "outside"
        outside.mkdir()
        (outside / "keep").write_text("mine")
        root = base / "root"
        root.mkdir()
        filled = [
            [(n, k, str(outside) if p == "OUT" else p, m) for n, k, p, m in layer]
            for layer in layers
        ]
        archive = save_archive(base / "img.tar", filled)
        with contextlib.suppress(ArchiveError):  # refusing is fine; writing outside is not
            apply_layers(archive, root)
        assert tree(outside) == {"keep": "mine"}
        assert sorted(p.name for p in base.iterdir()) == ["img.tar", "outside", "root"]
        for p in root.rglob("*"):  # nothing setuid or setgid made it in
            if not p.is_symlink():
                assert not p.lstat().st_mode & (stat.S_ISUID | stat.S_ISGID)


# -- a job in an image's root filesystem ------------------------------------------------

BUSYBOX = shutil.which("busybox")


def busybox_layers(script: str) -> list[list[Spec]]:
    assert BUSYBOX is not None
    return [
        [
            ("bin", "dir", b"", 0o755),
            ("bin/busybox", "file", Path(BUSYBOX).read_bytes(), 0o755),
            ("bin/sh", "symlink", "busybox", 0o777),
            ("etc", "dir", b"", 0o755),
            ("etc/motd", "file", b"from the image", 0o644),
            ("srv", "dir", b"", 0o755),
            ("srv/run.sh", "file", script.encode(), 0o755),
        ]
    ]


@pytest.mark.skipif(os.geteuid() != 0 or BUSYBOX is None, reason="needs root and busybox")
async def test_a_process_job_runs_the_image_chrooted_as_its_apps_uid(tmp_path: Path) -> None:
    script = (
        "#!/bin/sh\n"
        'echo "greeting=$GREETING port=$PORT job=$JOB_ID path=$PATH"\n'
        'echo "uid=$(busybox id -u) gid=$(busybox id -g) pwd=$(busybox pwd)"\n'
        "busybox cat /etc/motd; echo\n"
        "busybox touch /etc/x 2>/dev/null && echo writable || echo read-only\n"
        "busybox touch /tmp/x && echo tmp-writable\n"
        "echo devnull > /dev/null && echo dev-ok\n"
        "busybox ls /root 2>&1 | busybox head -1\n"
    )
    config = config_doc(
        Entrypoint=["/bin/sh"], Cmd=["/srv/run.sh"], WorkingDir="/srv",
        Env=["PATH=/bin", "GREETING=from-image", "OTHER=image"],
    )  # fmt: skip
    archive = save_archive(tmp_path / "img.tar", busybox_layers(script), config)
    image = await unpack_image(archive, tmp_path / "host", "sha256:busybox")
    async with open_process_backend(tmp_path / "host", shutdown_grace_s=1.0) as backend:
        if backend.isolation != "namespaces":
            pytest.skip(f"this host allows isolation {backend.isolation!r}, not namespaces")
        spec = job_spec(
            None, "img-1", "", env={"GREETING": "from-release"}, port=4321,  # type: ignore[arg-type]
            slug_dir=None, root=ImageRoot(image.rootfs, image.config),
        )  # fmt: skip
        await backend.start(spec)
        with trio.fail_after(20):
            status = await backend.wait("img-1")
        lines = [t for _, t in texts(backend, "img-1")]
        assert status == 0, lines
        uid = app_uid("app-1")
        assert lines == [
            "greeting=from-release port=4321 job=img-1 path=/bin",
            f"uid={uid} gid={uid} pwd=/srv",
            "from the image",
            "read-only",
            "tmp-writable",
            "dev-ok",
            "ls: /root: No such file or directory",
        ]
        # a one-off's command runs with sh -c in the image
        await backend.start(
            job_spec(None, "img-2", "echo $OTHER; exit 3", slug_dir=None,  # type: ignore[arg-type]
                     root=ImageRoot(image.rootfs, image.config))
        )  # fmt: skip
        with trio.fail_after(20):
            assert await backend.wait("img-2") == 3
        assert [t for _, t in texts(backend, "img-2")] == ["image"]
        backend.forget("img-1")
        assert (image.rootfs / "bin/busybox").exists()  # the image stays for the next job
        assert not (tmp_path / "host" / "jobs" / "img-1").exists()


# -- the container of an image job ------------------------------------------------------


def test_an_image_job_publishes_the_hosts_port_to_the_images_port() -> None:
    spec = job_spec(
        None, "job-1", "", port=20001, slug_dir=None, image="shop:1",  # type: ignore[arg-type]
        container_port=8000, host_addr="127.0.0.5",
    )  # fmt: skip
    args = container_args(spec, "node-a", image="shop:1", app_dir=None)
    assert args["ports"] == {"8000/tcp": ("127.0.0.5", 20001)}
    assert args["environment"]["PORT"] == "8000" and "command" not in args  # the image's own
    env = [f"{k}={v}" for k, v in args["environment"].items()]
    assert spec_from_container(args["labels"], env) == spec
    labels = {k: v for k, v in args["labels"].items() if k != "flynnp2p.container_port"}
    assert spec_from_container(labels, env).container_port is None  # a container of before
