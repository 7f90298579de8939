import json
import re

import pytest
import torch

from vlmoe.cli import main as vlmoe_main
from vlmoe.models import (
    VLMoEConfig,
    create_model,
    export_beit3,
    load_pretrained,
    read_state_dict,
    save_pretrained,
    vlmoe_to_beit3,
)


def _same(a, b, batch):
    image, ids, pad = batch
    with torch.no_grad():
        torch.testing.assert_close(
            a.eval()(image=image, text_ids=ids, text_padding_mask=pad).hidden_states,
            b.eval()(image=image, text_ids=ids, text_padding_mask=pad).hidden_states,
        )


@pytest.mark.parametrize("name", ["tiny", "tiny_mhmoe"])
def test_save_and_load_pretrained(name, perturb, tiny_batch, tmp_path):
    model = perturb(create_model(name))
    out = save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert VLMoEConfig.from_file(out / "config.json") == model.config
    loaded = load_pretrained(out)
    _same(model, loaded, tiny_batch)
    # the file alone carries its config in the safetensors metadata
    (out / "config.json").unlink()
    _same(model, load_pretrained(out / "model.safetensors"), tiny_batch)


def test_save_never_overwrites_unless_asked(tmp_path):
    model = create_model("tiny")
    save_pretrained(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="model.safetensors exists"):
        save_pretrained(create_model("tiny"), tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    save_pretrained(create_model("tiny"), tmp_path, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_beit3_to_vlmoe_to_beit3(perturb, tiny_batch, tmp_path, capsys):
    src = perturb(create_model("tiny"))
    torch.save({"model": vlmoe_to_beit3(src.state_dict())}, tmp_path / "beit3.pth")

    with pytest.warns(UserWarning, match="num_heads=1 assumes 64-wide heads"):
        vlmoe_main(["export", str(tmp_path / "beit3.pth"), str(tmp_path / "bad_heads")])
    vlmoe_main(["export", str(tmp_path / "beit3.pth"), str(tmp_path / "dense"), "--set", "num_heads=2"])
    printed = capsys.readouterr().out
    assert "every parameter loaded" in printed and "wrote" in printed
    _same(src, load_pretrained(tmp_path / "dense"), tiny_batch)

    # upcycle on the way, with a config override
    vlmoe_main(["export", str(tmp_path / "beit3.pth"), str(tmp_path / "moe"), "--config", "tiny_moe",
                "--set", "moe={top_k: 1, normalize_gates: true}", "--strict"])  # fmt: skip
    moe = load_pretrained(tmp_path / "moe")
    written = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert moe.config.moe.top_k == 1 and written["model"]["moe"]["top_k"] == 1 and written["task"] is None

    # and back to the BEiT-3 layout
    vlmoe_main(["export", str(tmp_path / "dense"), str(tmp_path / "back.safetensors"), "--to", "beit3"])
    sd, _ = read_state_dict(tmp_path / "back.safetensors")
    ref = vlmoe_to_beit3(src.state_dict())
    assert sd.keys() == ref.keys()
    for k in sd:
        assert torch.equal(sd[k], ref[k]), k


def _fails(capsys, argv):
    with pytest.raises(SystemExit) as e:
        vlmoe_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_errors_are_one_line(tmp_path, capsys):
    err = _fails(capsys, ["export", str(tmp_path / "nothing.pth"), str(tmp_path / "out")])
    assert re.fullmatch(r"vlmoe export: checkpoint .*nothing\.pth does not exist", err), err
    save_pretrained(create_model("tiny"), tmp_path / "m")
    assert "exists; pass overwrite" in _fails(capsys, ["export", str(tmp_path / "m"), str(tmp_path / "m")])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    err = _fails(capsys, ["export", str(tmp_path / "junk.safetensors"), str(tmp_path / "j"), "--config", "tiny"])
    assert "junk.safetensors: not a safetensors file or corrupt" in err


def test_exported_files_have_the_usual_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = save_pretrained(create_model("tiny"), tmp_path / "m")
        export_beit3(create_model("tiny"), tmp_path / "b.pth")
    finally:
        os.umask(old)
    for f in (out / "model.safetensors", out / "config.json", tmp_path / "b.pth"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def _folder_with_tokenizer(tmp_path, tokenizer):
    """A tiny model folder whose config.json names ``tokenizer`` as its preprocess tokenizer."""
    from vlmoe.data import preprocess_dict

    folder = save_pretrained(create_model("tiny"), tmp_path / "m", preprocess=preprocess_dict(32), overwrite=True)
    config = json.loads((folder / "config.json").read_text())
    config["preprocess"]["tokenizer"] = tokenizer
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_model_folder_never_makes_export_or_load_read_a_file_outside_it(tmp_path, capsys, monkeypatch):
    import vlmoe

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    secret = home / ".ssh" / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (home / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    monkeypatch.setenv("HOME", str(home))
    for name in ("~/.ssh/id_rsa", str(secret), "../home/tokenizer.json", "link.json"):
        folder = _folder_with_tokenizer(tmp_path, name)
        (folder / "link.json").unlink(missing_ok=True)
        (folder / "link.json").symlink_to(home / "tokenizer.json")  # inside by name, outside by its real path
        err = _fails(capsys, ["export", str(folder), str(tmp_path / "out"), "--overwrite"])
        assert f"config.json: preprocess.tokenizer {name!r} is outside the model folder" in err, err
        assert not (tmp_path / "out").exists()
        with pytest.raises(ValueError, match="preprocess.tokenizer"):
            vlmoe.load(folder)
    folder = _folder_with_tokenizer(tmp_path, "clip")  # a built-in tokenizer is a name, not a file
    vlmoe_main(["export", str(folder), str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_a_bundled_tokenizer_file_gets_no_broader_permissions_than_its_source(tmp_path):
    import os
    import stat

    from vlmoe.data import preprocess_dict

    tok = tmp_path / "spm.model"
    tok.write_bytes(b"a private tokenizer")
    tok.chmod(0o600)
    old = os.umask(0o022)
    try:
        out = save_pretrained(create_model("tiny"), tmp_path / "m", preprocess=preprocess_dict(32, tokenizer=str(tok)))
    finally:
        os.umask(old)
    assert (out / "spm.model").read_bytes() == b"a private tokenizer"
    assert stat.S_IMODE((out / "spm.model").stat().st_mode) == 0o600
    assert json.loads((out / "config.json").read_text())["preprocess"]["tokenizer"] == "spm.model"
    (tmp_path / "id_rsa").write_text("PRIVATE KEY")  # a file that is no tokenizer is never copied
    with pytest.raises(ValueError, match="is not a tokenizer file"):
        save_pretrained(create_model("tiny"), tmp_path / "n",
                        preprocess=preprocess_dict(32, tokenizer=str(tmp_path / "id_rsa")))
    assert not (tmp_path / "n" / "id_rsa").exists()


def test_a_training_checkpoint_cannot_have_a_local_file_copied(tmp_path, capsys):
    from vlmoe.data import preprocess_dict

    model = create_model("tiny")
    (tmp_path / "secrets.json").write_text('{"token": "s3cr3t"}')
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "vlmoe_config": model.config.to_dict(), "vlmoe_task": None,
                "vlmoe_preprocess": preprocess_dict(32, tokenizer=str(tmp_path / "secrets.json"))},
               tmp_path / "last.ckpt")
    err = _fails(capsys, ["export", str(tmp_path / "last.ckpt"), str(tmp_path / "out")])
    assert "secrets.json" in err and "it is not copied into" in err, err
    assert not (tmp_path / "out" / "secrets.json").exists()


def test_a_checkpoint_that_would_run_code_is_refused_saying_so(tmp_path, capsys):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    torch.save({"w": torch.zeros(1), "e": Evil()}, tmp_path / "evil.pth")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"e": Evil()}, protocol=4))
    for name, why in (("evil.pth", "(posix.system)"), ("evil.pkl", "refuses (pickle opcode FRAME)")):
        err = _fails(capsys, ["export", str(tmp_path / name), str(tmp_path / "out"), "--config", "tiny"])
        assert err.startswith(f"vlmoe export: {tmp_path / name}: ") and why in err and "run code" in err, err
        assert "not a checkpoint or corrupt" not in err and "weights_only=False" not in err
