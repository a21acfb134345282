"""Issue 14 (hardening): containment of training images, duplicate ids, broken JSONL lines,
one-line errors of the CLI, model-directory checks and the permissions of what is written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hires_lmm.cli import main
from hires_lmm.data.dataset import LlavaDataset
from hires_lmm.data.records import DataError, RecordError, load_records, validate
from hires_lmm.errors import CLIError, HiresError, ModelLoadError
from hires_lmm.model import HiresLMM
from hires_lmm.text import build_byte_tokenizer

CONV = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]


def rec(rid: str, image: str | None = "good.png") -> dict:
    r = {"id": rid, "conversations": [dict(t) for t in CONV] if image else
         [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    if image:
        r["image"] = image
    return r


def check(records, folder):
    return validate(records, image_folder=folder, tokenizer=build_byte_tokenizer(), template="vicuna_v1",
                    max_length=None, method=None)


def by_id(report) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in report.problems:
        out.setdefault(p.record_id, []).append(p.message)
    return out


# --- 1. training images stay inside --image-folder; duplicate ids are reported ---------------------

@pytest.fixture()
def folders(tmp_path):
    img, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    img.mkdir()
    elsewhere.mkdir()
    Image.new("RGB", (64, 48), "red").save(img / "good.png")
    Image.new("RGB", (64, 48), "blue").save(elsewhere / "secret.png")
    (img / "link.png").symlink_to(elsewhere / "secret.png")
    (img / "sub").mkdir()
    (img / "sub" / "inner.png").symlink_to(img / "good.png")  # a link that stays inside is fine
    return img, elsewhere


def test_images_outside_the_image_folder_are_refused_by_id_and_file(tmp_path, folders):
    img, elsewhere = folders
    data = [rec("ok"), rec("ok-abs", str(img / "good.png")), rec("ok-link", "sub/inner.png"),
            rec("dotdot", "../elsewhere/secret.png"), rec("abs", str(elsewhere / "secret.png")),
            rec("link", "link.png"), rec("sneaky", "sub/../../elsewhere/secret.png")]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    report = check(load_records(path, strict=False), img)
    bad = by_id(report)
    assert set(bad) == {"dotdot", "abs", "link", "sneaky"}
    for rid, msgs in bad.items():
        assert len(msgs) == 1 and "outside the image folder" in msgs[0], (rid, msgs)
        assert all(p.source == str(path) for p in report.problems)
    assert [r.id for r in report.ok_records] == ["ok", "ok-abs", "ok-link"]
    # a folder that is itself a symlink: the entries inside it are still inside
    (tmp_path / "alias").symlink_to(img)
    assert check(load_records(path, strict=False)[:3], tmp_path / "alias").ok
    # the dataset refuses them too (records that never went through validate)
    tok = build_byte_tokenizer()
    ds = LlavaDataset(load_records(path, strict=False), image_folder=img, tokenizer=tok, template="vicuna_v1",
                      method="llava-1.5")
    assert ds[0]["images"] == [str(img / "good.png")]
    with pytest.raises(DataError, match=r"record 'dotdot'.*outside the image folder"):
        ds[3]
    with pytest.raises(DataError, match=r"record 'dotdot'.*outside the image folder"):
        ds.lengths()


def test_duplicate_record_ids_are_reported(tmp_path, folders):
    img, _ = folders
    a = tmp_path / "a.json"
    a.write_text(json.dumps([rec("x"), rec("y"), rec("x"), {"conversations": CONV, "image": "good.png"}]))
    b = tmp_path / "b.json"
    b.write_text(json.dumps([rec("y"), {"conversations": CONV, "image": "good.png"}]))
    report = check(load_records([a, b], strict=False), img)
    assert [(p.record_id, p.source) for p in report.problems] == [("x", str(a)), ("y", str(b))]
    assert "duplicate id" in report.problems[0].message and f"record #0 of {a}" in report.problems[0].message
    assert [r.id for r in report.ok_records] == ["x", "y", "a.json#3", "b.json#1"]  # made-up ids never clash
    # a mixture listing the same file twice (to upweight it) repeats records, not ids
    (tmp_path / "mix.yaml").write_text("datasets:\n  - json_path: b.json\n  - json_path: b.json\n")
    assert check(load_records(tmp_path / "mix.yaml", strict=False), img).ok


# --- 2. one broken JSONL line is one bad record, skipped by --skip-bad -------------------------

def broken_jsonl(path: Path) -> Path:
    lines = [json.dumps(rec("r0")).encode(), b'{"id": "r1", "conversations": "\xff\xfe"}',
             json.dumps(rec("r2")).encode(), b"", b"{oops", json.dumps(rec("r5")).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_broken_jsonl_lines_are_bad_records_named_by_line(tmp_path, folders):
    img, _ = folders
    path = broken_jsonl(tmp_path / "d.jsonl")
    with pytest.raises(RecordError) as e:
        load_records(path)
    msg = str(e.value)
    assert "2 bad record(s) of 5" in msg and "line 2: not UTF-8" in msg and "line 5: malformed JSON" in msg
    assert str(path) in msg
    report = check(load_records(path, strict=False), img)
    assert [(p.record_id, p.message.split(":")[0]) for p in report.problems] == [("d.jsonl#1", "line 2"),
                                                                               ("d.jsonl#3", "line 5")]
    assert [r.id for r in report.ok_records] == ["r0", "r2", "r5"]  # what --skip-bad trains on
    # JSON lines in a .json file are read the same way, non-UTF-8 bytes included
    shutil.copy(path, tmp_path / "d.json")
    assert [r.id for r in check(load_records(tmp_path / "d.json", strict=False), img).ok_records] == ["r0", "r2", "r5"]
    # a JSON list file with a bad byte is one document: refused whole, naming the line
    (tmp_path / "list.json").write_bytes(b'[\n{"id": "a"},\n"\xff"]')
    with pytest.raises(DataError, match=r"list.json.*not UTF-8 text at line 3"):
        load_records(tmp_path / "list.json")


def test_train_skip_bad_skips_broken_jsonl_lines(tmp_path, folders, capsys):
    img, _ = folders
    path = broken_jsonl(tmp_path / "d.jsonl")
    args = ["train", "-m", "llava-1.5", "--tiny", "--data-path", str(path), "--image-folder", str(img),
            "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "2", "--no-progress"]
    assert main(args) == 2
    assert "line 2: not UTF-8" in capsys.readouterr().err
    assert main([*args, "--skip-bad", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["skipped_records"] == 2


# --- 3. one-line errors instead of tracebacks -----------------------------------------------------

def truncated_png(path: Path) -> Path:
    Image.new("RGB", (64, 64), "green").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"hires {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("out", [False, True])
def test_plan_refuses_a_truncated_image(tmp_path, capsys, out):
    bad = truncated_png(tmp_path / "half.png")
    extra = ["--out", str(tmp_path / "o.png")] if out else []
    assert main(["plan", "-m", "llava-1.5", str(bad), *extra]) == 2
    line = one_error_line(capsys.readouterr().err, "plan")
    assert "half.png" in line and "truncated" in line
    assert not (tmp_path / "o.png").exists()


def test_plan_of_a_size_imports_no_torch():
    # cmd_plan itself (the parser loads the other subcommands' modules, which may import torch)
    code = ("import sys, argparse; from hires_lmm.cli import cmd_plan; cmd_plan(argparse.Namespace(method='slime', "
            "size=['99x77'], images=[], json=True, out=None, max_pixels=10, max_visual_tokens=None)); "
            "print('torch' in sys.modules, 'PIL' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_python_m_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hires_lmm.cli", "convert", "--from", "auto", str(tmp_path / "nonexistent"),
                        str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "no such checkpoint directory" in one_error_line(r.stderr, "convert")


def test_error_classes_come_from_one_leaf_module():
    import hires_lmm.cli
    import hires_lmm.convert.cli
    import hires_lmm.eval.cli

    assert hires_lmm.cli.CLIError is CLIError is hires_lmm.convert.cli.CLIError is hires_lmm.eval.cli.CLIError
    assert issubclass(CLIError, HiresError) and issubclass(ModelLoadError, (HiresError, ValueError))
    from hires_lmm.convert import ConversionError

    assert issubclass(DataError, HiresError) and issubclass(ConversionError, HiresError)
    src = Path(hires_lmm.errors.__file__).read_text()
    assert "from ." not in src and "import hires_lmm" not in src  # a leaf: nothing of the package


def test_any_hires_error_prints_one_line(monkeypatch, capsys):
    import hires_lmm.cli

    class TrainerError(HiresError, RuntimeError):
        """What the trainer's own typed error looks like."""

    def boom(args):
        raise TrainerError("the output directory is locked\nby another run")

    monkeypatch.setattr(hires_lmm.cli, "cmd_plan", boom)
    assert main(["plan", "-m", "slime", "--size", "9x9"]) == 2
    assert one_error_line(capsys.readouterr().err, "plan") == \
        "hires plan: error: the output directory is locked; by another run"


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), ValueError("lr must be\npositive")])
def test_train_prints_one_line_for_os_and_value_errors(monkeypatch, capsys, tmp_path, exc):
    import hires_lmm.train.trainer

    def boom(cfg):
        raise exc

    monkeypatch.setattr(hires_lmm.train.trainer, "train", boom)
    code = main(["train", "-m", "llava-1.5", "--tiny", "--data-path", str(tmp_path / "d.json"),
                 "--output-dir", str(tmp_path / "o")])
    assert code == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert ("No space left on device" in line) if isinstance(exc, OSError) else line.endswith("lr must be; positive")


# --- 4. model directory checks ------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    from hires_lmm.methods import build_model

    root = tmp_path_factory.mktemp("hardening")
    build_model("llava-1.5", tiny=True, seed=0).save_pretrained(root / "m", max_shard_size="200KB")
    Image.new("RGB", (64, 48), "red").save(root / "red.png")
    return root / "m"


def variant(saved: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / "variant"
    shutil.copytree(saved, d)
    edit(d)
    return d


def edit_config(**fields):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        for k, v in fields.items():
            if v is None:
                cfg.pop(k, None)
            elif isinstance(v, dict):
                cfg[k] = {**cfg[k], **v}
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def only_bin(d: Path) -> None:
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded anyway")


def index_outside(d: Path) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    shard = index["weight_map"][first]
    shutil.move(d / shard, d.parent / shard)  # the shard now lives next to the directory
    index["weight_map"] = {k: (f"../{shard}" if v == shard else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:1000])


BROKEN = {
    "broken-json": (lambda d: (d / "config.json").write_text('{"method": "llava-1.5",'), r"config\.json: not valid JSON"),
    "not-utf8": (lambda d: (d / "config.json").write_bytes(b'{"method": "\xff"}'), r"config\.json: not UTF-8"),
    "no-image-token": (edit_config(image_token=None), r"config\.json: has no image_token"),
    "other-image-token": (edit_config(image_token="<img>"), r"config\.json: has image_token '<img>'"),
    "hidden-size": (edit_config(text_config={"hidden_size": 96}), r"do not match the shapes config\.json asks for.*model-0"),
    "only-bin": (only_bin, r"only \.bin weights \(pytorch_model\.bin\)"),
    "index-outside": (index_outside, r"model\.safetensors\.index\.json: weight file '\.\./.*' is not a file inside"),
    "truncated-shard": (lambda d: truncate(sorted(d.glob("model-*.safetensors"))[0]),
                        r"model-00001-of-0000\d\.safetensors: not a readable safetensors file"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_model_directories_are_refused_in_one_line(saved, tmp_path, capsys, case):
    edit, match = BROKEN[case]
    d = variant(saved, tmp_path, edit)
    with pytest.raises(ModelLoadError, match=match) as e:
        HiresLMM.from_pretrained(d)
    assert "\n" not in str(e.value) and str(d) in str(e.value)
    # chat and predict print it as one line, exit status 2
    assert main(["chat", "--model", str(d), "--image", str(saved.parent / "red.png"), "hi"]) == 2
    assert str(d) in one_error_line(capsys.readouterr().err, "chat")
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": "red.png", "text": "hi"}) + "\n")
    assert main(["predict", "--model", str(d), "--question-file", str(q), "--image-folder", str(saved.parent),
                 "--answers-file", str(tmp_path / "a.jsonl"), "--no-progress"]) == 2
    assert str(d) in one_error_line(capsys.readouterr().err, "predict")


def test_tokenizer_without_the_image_token_is_refused(saved, tmp_path):
    def drop(d: Path) -> None:
        tj = json.loads((d / "tokenizer.json").read_text())
        tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] != "<image>"]
        (d / "tokenizer.json").write_text(json.dumps(tj))
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc["extra_special_tokens"] = []
        (d / "tokenizer_config.json").write_text(json.dumps(tc))

    with pytest.raises(ModelLoadError, match="the tokenizer has no '<image>' token"):
        HiresLMM.from_pretrained(variant(saved, tmp_path, drop))


def test_the_intact_directory_still_loads(saved):
    assert HiresLMM.from_pretrained(saved).config.method == "llava-1.5"


# --- 5. what save_pretrained / hires convert write has the user's umask permissions -------------------

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_model_has_umask_permissions(tmp_path, umask):
    from hires_lmm.methods import build_model

    model = build_model("llava-1.5", tiny=True, seed=0)
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "m", max_shard_size="200KB")
        (tmp_path / "m" / "keep.txt").write_text("mine")
        model.save_pretrained(tmp_path / "m")  # over an existing directory: moved file by file
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~umask
    files = list((tmp_path / "m").iterdir())
    assert any(f.suffix == ".safetensors" for f in files) and (tmp_path / "m" / "config.json") in files
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
