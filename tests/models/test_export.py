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
