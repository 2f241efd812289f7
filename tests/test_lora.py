"""LoRAs loaded into built engines without a rebuild: LoRAs made with PEFT on the bundled digits model (small
rank, non-zero B), against eager PyTorch with the LoRA fused by diffusers, and unloaded back to the base.
The compiled backends' LoRA test is in test_backends.py, on the engines it builds anyway."""

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict

import svdexport
from helpers import assert_one_line_error, check_lora_engine, digits_model, graph_inputs, make_lora, quick_engine
from helpers import run_cli
from svdexport.cli import main
from svdexport.errors import SvdExportError

@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("lora") / "digits_lora.safetensors", digits_model())


def test_eager_engine_loads_and_unloads_a_lora(tmp_path_factory, tmp_path, lora, capsys):
    folder = quick_engine(tmp_path_factory, "eager-lora")
    check_lora_engine(svdexport.load(folder), lora, 1e-5)
    png = tmp_path / "digit.png"
    code, out, _ = run_cli(capsys, "run", folder, "--lora", f"{lora}:0.5", "--lora", lora, "--out", png, "--steps", "4")
    assert code == 0 and png.exists() and f"LoRA {lora}:0.5, {lora}:1:" in out and "(no rebuild)" in out


def test_only_the_adapted_weights_are_read_and_fuse_as_on_the_whole_model(tmp_path_factory, lora, monkeypatch):
    """engine.load_lora fuses on a hollow transformer with only the adapted modules' base weights read from the
    safetensors (`base_weights`): the pushed weights equal those of fusing into the whole base model, bitwise;
    where the files do not hold a name, the whole model is loaded instead, with the same values."""
    from svdexport.models.lora import LoraFile, fuse, hollow_of
    from svdexport.runtime import base as base_mod
    from svdexport.runtime.loras import graph_weights

    engine = svdexport.load(quick_engine(tmp_path_factory, "lora-partial"))
    fam, gran, loras = engine.family, engine.cache.granularity, [LoraFile(lora, 0.8), LoraFile(lora, -0.3)]
    model = base_mod.base_model(engine.manifest, device="cpu")
    whole = graph_weights(fam, model, gran, fuse(model, fam.lora_loader, loras))
    asked = []

    def fill(names):
        asked.extend(names)
        return base_mod.base_weights(engine.manifest, names)

    hollow = hollow_of(fam.transformer_class(), engine.config, engine.dtype)
    partial = graph_weights(fam, hollow, gran, fuse(hollow, fam.lora_loader, loras, fill=fill))
    for swap in ("new", "base"):
        a, b = getattr(whole, swap), getattr(partial, swap)
        assert a.keys() == b.keys() and all(a[g].keys() == b[g].keys() for g in a)
        assert all(torch.equal(a[g][k], b[g][k]) for g in a for k in a[g])
    params = dict(model.named_parameters())
    assert len(asked) == len(set(asked)) and 0 < len(asked) < len(params) / 2  # each adapted weight read once
    read = base_mod.base_weights(engine.manifest, asked)
    monkeypatch.setattr(base_mod, "read_tensors", lambda files, names, dtype: {})  # as for generated weights
    whole_read = base_mod.base_weights(engine.manifest, asked)
    assert read.keys() == whole_read.keys() and all(torch.equal(read[n], whole_read[n]) for n in read)


def test_lora_options_are_checked_in_one_line(tmp_path_factory, tmp_path, capsys, lora):
    from safetensors.torch import save_file

    engine = quick_engine(tmp_path_factory, "lora-options")
    capsys.readouterr()  # the build's progress
    out = ["--out", tmp_path / "x.png"]
    save_file({"transformer.no_block.attn.to_q.lora_A.weight": torch.randn(4, 128),
               "transformer.no_block.attn.to_q.lora_B.weight": torch.randn(128, 4)}, str(tmp_path / "nomatch.st"))
    save_file({"unet.up.lora_A.weight": torch.randn(4, 8)}, str(tmp_path / "other.st"))
    cases = [(tmp_path / "missing.safetensors", "not found"), (f"{lora}:big", "SCALE must be a number"),
             (engine / "bases.safetensors", "is not a LoRA"), (tmp_path / "nomatch.st", "made for another model"),
             (tmp_path / "other.st", "matches nothing")]
    for spec, words in cases:
        code, _, err = run_cli(capsys, "run", engine, "--lora", spec, *out)
        assert_one_line_error(code, err, words)
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SvdExportError, match="scale must be a number"):
        svdexport.load(engine).load_lora(lora, scale="x")


@pytest.mark.slow
def test_apply_fuses_the_pipelines_loras(tmp_path_factory):
    from svdexport.builder.build import BuildOptions, build
    from tiny_pipeline import prompt_embeds, tiny_pipeline

    def call(pipe):
        return pipe(generator=torch.Generator().manual_seed(1), num_inference_steps=6, height=128, width=128,
                    guidance_scale=3.5, output_type="pt", **prompt_embeds()).images

    root = tmp_path_factory.mktemp("lora-pipe")
    tiny_pipeline().save_pretrained(root / "pipe")
    build(BuildOptions(weights=str(root / "pipe"), shapes=dict(height=128, width=128, text_len=8), calib_samples=1,
                       calib_steps=4), root / "engine", progress=False)
    engine = svdexport.load(root / "engine")
    path = make_lora(root / "tiny_lora.safetensors", tiny_pipeline().transformer, scale=1.0)
    pipe = tiny_pipeline()
    base = call(pipe)
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.7])
    reference = call(pipe)  # eager diffusers with the PEFT adapter active
    got = call(svdexport.apply(pipe, engine, interval=1))
    assert (reference - base).abs().max() > 1e-2
    assert (got - reference).abs().max() <= 1e-4
    assert pipe.transformer.engine.lora_weights() > 0


def materialize(hollowed, base):
    """A copy of a hollow transformer whose base weights are `base`'s (the plain model of the same config,
    shared) and whose adapters are the hollow one's: what PEFT can fuse, for comparing with diffusers."""
    import copy

    from svdexport.models.lora import adapter_tensors

    plain = {**dict(base.named_parameters()), **dict(base.named_buffers())}
    keep = {id(t) for t in adapter_tensors(hollowed)}
    named = (*hollowed.named_parameters(), *hollowed.named_buffers())
    # PEFT moves a wrapped module's weights under `base_layer`; the plain model's names lack it.
    memo = {id(t): plain[name.replace(".base_layer", "")] for name, t in named if id(t) not in keep}
    return copy.deepcopy(hollowed, memo)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # PEFT, on the second adapter: intended
def test_hollow_transformer_takes_loras_without_its_weights(lora):
    """What a pipeline running an engine keeps of its transformer: diffusers loads a LoRA into it as into the
    real model, with no memory for the base weights; its adapter state changes with every LoRA operation; and
    fused onto the real weights it gives diffusers' own fused model bit for bit."""
    from svdexport.models.lora import adapter_state, fuse_active, hollow

    model = digits_model()
    shell = hollow(model)
    assert sum(p.untyped_storage().nbytes() for p in shell.parameters()) < 1e-3 * sum(
        p.untyped_storage().nbytes() for p in model.parameters())
    states = [adapter_state(shell)]
    shell.load_lora_adapter(str(lora), prefix="transformer", adapter_name="a")
    states.append(adapter_state(shell))
    shell.set_adapters(["a"], [0.6])
    states += [adapter_state(shell), adapter_state(shell)]
    assert states[0] == () and states[1] != states[2] and states[2] == states[3]
    shell.disable_lora()
    assert adapter_state(shell) != states[2] and not fuse_active(materialize(shell, digits_model())).params
    shell.enable_lora()
    reference = digits_model()
    reference.load_lora_adapter(str(lora), prefix="transformer", adapter_name="a")
    reference.set_adapters(["a"], [0.6])
    reference.fuse_lora()
    reference.unload_lora()
    fused = materialize(shell, digits_model())
    want, base = dict(reference.named_parameters()), dict(model.named_parameters())
    changed = fuse_active(fused).params
    assert changed and set(changed) == {n for n, p in want.items() if not torch.equal(p, base[n])}
    assert all(torch.equal(p, want[n]) for n, p in fused.named_parameters())
    shell.load_lora_adapter(str(lora), prefix="transformer", adapter_name="b")  # a second adapter is a change
    assert adapter_state(shell) != states[2]
    shell.unload_lora()
    assert adapter_state(shell) == ()


def test_bench_times_the_lora_load(tmp_path_factory, lora, capsys):
    engine = quick_engine(tmp_path_factory, "lora-bench")
    capsys.readouterr()
    code, out, _ = run_cli(capsys, "bench", "lora", engine, "--lora", lora, "--no-rebuild", "--repeats", "1")
    assert code == 0 and "LoRA load" in out and "26 weights replaced" in out
    assert_one_line_error(*run_cli(capsys, "bench", "lora", engine, "--no-rebuild")[::2], "required", "--lora")
    # bench --lora of 0.4.0 is its own subcommand now: the old form says so in one line
    assert_one_line_error(*run_cli(capsys, "bench", engine, "--lora", lora)[::2], "bench lora ENGINE --lora FILE")


def test_the_steady_load_time_leaves_the_first_load_out():
    from svdexport.bench.lora import steady_median

    assert steady_median([17.0, 5.0, 6.0, 100.0]) == 6.0 and steady_median([17.0, 5.0]) == 5.0
    assert steady_median([3.0]) == 3.0  # one load: it is both


def test_kohya_names_are_converted_by_diffusers(tmp_path_factory, tmp_path):
    """The same LoRA in Kohya's names (BFL module names, lora_down/lora_up, alpha) and in diffusers' names."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 128, generator=g) * 0.1, torch.randn(128, 4, generator=g) * 0.1
    kohya = {"lora_unet_double_blocks_1_img_attn_proj.lora_down.weight": down,
             "lora_unet_double_blocks_1_img_attn_proj.lora_up.weight": up,
             "lora_unet_double_blocks_1_img_attn_proj.alpha": torch.tensor(4.0)}
    ours = {"transformer.transformer_blocks.1.attn.to_out.0.lora_A.weight": down,
            "transformer.transformer_blocks.1.attn.to_out.0.lora_B.weight": up}
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    save_file(ours, str(tmp_path / "diffusers.safetensors"))
    engine = svdexport.load(quick_engine(tmp_path_factory, "lora-kohya"))
    base = engine.generate(seed=0, steps=4).latents
    outs = []
    for name in ("kohya", "diffusers"):
        engine.load_lora(tmp_path / f"{name}.safetensors")
        assert engine.lora_weights() == 1
        outs.append(engine.generate(seed=0, steps=4).latents)
        engine.unload_lora()
    assert (outs[0] - base).abs().max() > 1e-3
    assert (outs[0] - outs[1]).abs().max() <= 1e-6


@pytest.fixture(scope="module")
def hv_engine(tmp_path_factory):
    """The bundled HunyuanVideo digits model, eager, one calibration step."""
    out = tmp_path_factory.mktemp("hv-lora") / "engine"
    assert main(["build", "--model", "hunyuanvideo", "--weights", "bundled:digits", "--calib-samples", "1",
                 "--calib-steps", "1", "--out", str(out)]) == 0
    return out


def test_hunyuanvideo_engine_takes_a_lora(hv_engine):
    from diffusers import HunyuanVideoPipeline

    from svdexport.models.hunyuanvideo import HUNYUANVIDEO as HV

    out = hv_engine
    engine = svdexport.load(out)
    model = HV.load(HV.inspect("bundled:digits"), engine.dtype)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "proj_out"]))
    state = {k: v * 0.5 for k, v in get_peft_model_state_dict(model).items()}
    model.unload_lora()
    HunyuanVideoPipeline.save_lora_weights(out.parent, transformer_lora_layers=state, weight_name="hv.safetensors")
    base = engine.generate(seed=0, steps=4).latents
    engine.load_lora(out.parent / "hv.safetensors")
    model.load_lora_adapter(str(out.parent / "hv.safetensors"), prefix="transformer")
    model.fuse_lora()
    full, _ = HV.graphs(model, engine.cache.granularity)
    inputs = graph_inputs(engine, "full")
    with torch.no_grad():
        got, want = engine.full(*inputs)[0], full(*inputs)[0]
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()  # eager engine in the model's bf16
    assert (engine.generate(seed=0, steps=4).latents - base).abs().max() > 1e-2
    engine.unload_lora()
    assert torch.equal(engine.generate(seed=0, steps=4).latents, base)


def test_a_lora_of_another_model_is_refused_naming_the_missing_modules(hv_engine, tmp_path, lora, capsys):
    """A FLUX LoRA on a HunyuanVideo engine: PEFT would adapt the modules both models name alike and drop the
    others' weights without a word. Refused in one line by `run --lora` and `engine.load_lora`, nothing loaded."""
    png = tmp_path / "x.gif"
    code, out, err = run_cli(capsys, "run", hv_engine, "--lora", lora, "--out", png, "--steps", "2")
    assert_one_line_error(code, err, "made for another model", "target modules are not in this "
                          "HunyuanVideoTransformer3DModel", "single_transformer_blocks.")
    assert "weights replaced" not in out and not png.exists()
    engine = svdexport.load(hv_engine)
    base = engine.generate(seed=0, steps=2).latents
    with pytest.raises(SvdExportError, match=r"made for another model: \d+ of its \d+ target modules"):
        engine.load_lora(lora)
    assert engine.loras == [] and engine.lora_weights() == 0
    assert torch.equal(engine.generate(seed=0, steps=2).latents, base)


def test_a_pipeline_refuses_a_lora_of_another_model(tmp_path_factory, lora):
    """The same through svdexport.apply and the pipeline's own loader (pipe.load_lora_weights)."""
    from diffusers import HunyuanVideoPipeline
    from tiny_video_pipeline import tiny_video_pipeline

    root = tmp_path_factory.mktemp("hv-pipe-lora")
    tiny_video_pipeline().save_pretrained(root / "pipe")
    assert main(["build", "--weights", str(root / "pipe"), "--out", str(root / "engine"), "--model", "hunyuanvideo",
                 "--frames", "9", "--height", "64", "--width", "64", "--text-len", "8", "--k-max", "16",
                 "--calib-samples", "1", "--calib-steps", "1"]) == 0
    pipe = svdexport.apply(HunyuanVideoPipeline.from_pretrained(root / "pipe"), svdexport.load(root / "engine"))
    with pytest.raises(SvdExportError, match="made for another model"):
        pipe.load_lora_weights(str(lora), adapter_name="flux")
    assert not getattr(pipe.transformer.hollow, "peft_config", None)  # nothing half loaded
