"""The segmentation models: shapes, fused == plain torch.nn (values and gradients), masking, errors,
rebuilding from config(), channels-last, autocast and torch.compile."""

import json

import pytest
import torch

from medmap_fast.models import MODEL_CLASSES, SLSNet, SegOutput, UNet3D, build_model

B, M, SIZE = 2, 4, 16
TINY = dict(base_channels=4, depth=3)
# sample 0 has T1 only, sample 1 has all four modalities
MASK = torch.tensor([[True, False, False, False], [True, True, True, True]])
FUSIONS = ("mean", "weighted", "zero_concat", "anchor_impute")
# (model name, extra constructor arguments): UNet3D and SLSNet with every fusion
VARIANTS = [("unet3d", {})] + [("slsnet", {"fusion": f}) for f in FUSIONS]
VARIANT_IDS = ["unet3d"] + [f"slsnet-{f}" for f in FUSIONS]


def make(name, fused=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model(name, **{**TINY, "fused": fused, **kwargs})


def image(dtype=torch.float32, seed=1, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, M, size, size, size, generator=g).to(dtype)


def randomise(model, seed=2):
    """Move every parameter off its initial value (zero biases, zero fusion weights) so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def outputs_and_grads(model, x, mask):
    """Every output of ``return_all`` and the gradients of a loss on all of them, w.r.t. x and each parameter."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x, mask, return_all=True)
    # A missing modality's encoder sees a constant (zero) input, which instance norm maps to rounding
    # noise times 1/sqrt(eps); those features are never used (the alignment ops ignore them, as here).
    keep = mask.view(B, M, 1, 1, 1, 1)
    tensors = [*out.logits, *(torch.where(keep, f, 0) for f in out.modality_features.values())]
    g = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=g).to(t)).sum() for t in tensors)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return [t.detach() for t in tensors], x.grad, grads


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [3, 4])
@pytest.mark.parametrize("deep_supervision", [True, False])
@pytest.mark.parametrize("name", ["unet3d", "slsnet"])
def test_output_shapes(name, deep_supervision, num_classes):
    model = make(name, num_classes=num_classes, deep_supervision=deep_supervision)
    x = image()
    with torch.no_grad():
        logits = model(x, MASK)
        out = model(x, MASK, return_all=True)
    assert logits.shape == (B, num_classes, SIZE, SIZE, SIZE)
    assert isinstance(out, SegOutput)
    depth = TINY["depth"]
    levels = depth - 1 if deep_supervision else 1  # nnU-Net: no head on the bottleneck
    assert [t.shape for t in out.logits] == [(B, num_classes, *(3 * (SIZE >> i,))) for i in range(levels)]
    torch.testing.assert_close(out.logits[0], logits, atol=0, rtol=0)
    channels = [TINY["base_channels"] * 2 ** i for i in range(depth)]
    assert sorted(out.features) == list(range(depth))
    for level, feats in out.features.items():
        assert feats.shape == (B, channels[level], *(3 * (SIZE >> level,)))
    if name == "unet3d":
        assert out.modality_features == {}
    else:
        assert sorted(out.modality_features) == [depth - 1]  # default: the bottleneck
        assert out.modality_features[depth - 1].shape == (B, M, channels[-1], *(3 * (SIZE >> (depth - 1),)))


def test_channel_cap_and_align_levels():
    model = make("slsnet", base_channels=4, depth=4, max_channels=12, align_levels=[2, 0])
    assert model.align_levels == (0, 2)
    with torch.no_grad():
        out = model(image(), MASK, return_all=True)
    assert [out.features[i].shape[1] for i in range(4)] == [4, 8, 12, 12]
    assert sorted(out.modality_features) == [0, 2]
    assert out.modality_features[0].shape == (B, M, 4, SIZE, SIZE, SIZE)
    assert out.modality_features[2].shape == (B, M, 12, 4, 4, 4)
    # the stacked features are the per-modality encoders' outputs
    per_level = model.encode(image() * MASK.view(B, M, 1, 1, 1))
    for k in range(M):
        torch.testing.assert_close(out.modality_features[2][:, k], per_level[2][k], atol=0, rtol=0)


def test_unet_encode_decode_on_single_modality_batches():
    model = make("unet3d")
    x = image()
    single = (x.unsqueeze(1) * torch.eye(M)[None, :, :, None, None, None]).flatten(0, 1)  # (B*M, M, ...)
    with torch.no_grad():
        feats = model.encode(single)
        assert [f.shape for f in feats] == [(B * M, 4, 16, 16, 16), (B * M, 8, 8, 8, 8), (B * M, 16, 4, 4, 4)]
        out = model(x, None, return_all=True)
        logits = model.decode(model.encode(x))
    for a, b in zip(logits, out.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_small_configuration():
    for cls in (UNet3D, SLSNet):
        model = cls.small(num_classes=4)
        assert model.config()["base_channels"] == 8 and model.config()["depth"] == 4
        assert model.config()["num_classes"] == 4


# ----------------------------------------------------------------------------------------------
# Fused == plain torch.nn
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=VARIANT_IDS)
def test_fused_and_plain_have_the_same_weights_and_load_both_ways(name, kwargs):
    fused, plain = make(name, True, **kwargs), make(name, False, **kwargs)
    sd_fused, sd_plain = fused.state_dict(), plain.state_dict()
    assert list(sd_fused) == list(sd_plain)
    for key in sd_fused:
        assert torch.equal(sd_fused[key], sd_plain[key]), key
    # He initialisation: zero biases everywhere (and the norms' are zero too)
    assert all(not v.any() for k, v in sd_fused.items() if k.endswith("bias"))
    randomise(fused)
    plain.load_state_dict(fused.state_dict(), strict=True)
    fused.load_state_dict(randomise(plain, seed=5).state_dict(), strict=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value), key


@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=VARIANT_IDS)
def test_fused_equals_plain_in_float64(name, kwargs):
    fused = randomise(make(name, True, **kwargs)).double()
    plain = make(name, False, **kwargs).double()
    plain.load_state_dict(fused.state_dict(), strict=True)
    x = image(torch.float64, size=8)  # float64 convolutions on the CPU are slow (no oneDNN)
    y_f, dx_f, g_f = outputs_and_grads(fused, x, MASK)
    y_p, dx_p, g_p = outputs_and_grads(plain, x, MASK)
    # the biases of convolutions followed by instance norm have a zero gradient up to rounding
    tol = dict(atol=1e-10, rtol=1e-9)
    for a, b in zip(y_f, y_p):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(dx_f, dx_p, **tol)
    assert not dx_f[0, 1:].any()  # missing modalities' inputs get no gradient
    assert g_f.keys() == g_p.keys()
    for key in g_f:
        assert g_f[key] is not None, f"{key} gets no gradient"
        torch.testing.assert_close(g_f[key], g_p[key], **tol, msg=lambda m: f"grad of {key}: {m}")


@pytest.mark.parametrize("name,kwargs", [VARIANTS[0], VARIANTS[3]], ids=[VARIANT_IDS[0], VARIANT_IDS[3]])
def test_channels_last_float32_matches_plain(name, kwargs):
    fused = randomise(make(name, True, **kwargs)).to(memory_format=torch.channels_last_3d)
    plain = make(name, False, **kwargs)
    plain.load_state_dict(fused.state_dict(), strict=True)
    x = image()
    y_f, dx_f, g_f = outputs_and_grads(fused, x.contiguous(memory_format=torch.channels_last_3d), MASK)
    y_p, dx_p, g_p = outputs_and_grads(plain, x, MASK)
    with torch.no_grad():
        features = fused(x.contiguous(memory_format=torch.channels_last_3d), MASK, return_all=True).features
    # no layout copies between the blocks (the logits' layout is the head convolution's choice: with one
    # thread, torch's CPU convolution returns a 3-channel 1x1x1 output contiguous)
    assert all(f.is_contiguous(memory_format=torch.channels_last_3d) for f in features.values())
    # float32 rounding, amplified by the norms; the (zero up to rounding) gradients of the convolution
    # biases before instance norms are as large as that rounding, hence the absolute tolerance
    tol = dict(atol=1e-3, rtol=1e-3)
    for a, b in zip(y_f, y_p):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(dx_f, dx_p, **tol)
    for key in g_f:
        torch.testing.assert_close(g_f[key], g_p[key], **tol, msg=lambda m: f"grad of {key}: {m}")


# ----------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=VARIANT_IDS)
def test_missing_modality_values_do_not_matter(name, kwargs):
    model = randomise(make(name, **kwargs))
    x = image()
    poisoned = x.clone()
    poisoned[0, 1] = float("nan")
    poisoned[0, 2] = 1e30
    poisoned[0, 3] = -float("inf")
    with torch.no_grad():
        clean = model(x, MASK, return_all=True)
        dirty = model(poisoned, MASK.to(torch.uint8), return_all=True)  # 0/1 masks work too
    for a, b in zip(clean.logits, dirty.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.isfinite(dirty.logits[0]).all()


@pytest.mark.parametrize("name", ["unet3d", "slsnet"])
def test_no_mask_means_all_present(name):
    model = make(name)
    x = image()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, torch.ones(B, M, dtype=torch.bool)), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet3d", "slsnet"])
def test_spatial_size_not_divisible_is_refused(name):
    model = make(name)
    with pytest.raises(ValueError, match=r"x: spatial size \(16, 18, 16\) must be divisible by 2\*\*\(depth-1\) = 4"):
        model(torch.zeros(B, M, 16, 18, 16), MASK)


@pytest.mark.parametrize("name", ["unet3d", "slsnet"])
def test_bad_inputs_are_refused(name):
    model = make(name)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.zeros(B, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="mask must have shape"):
        model(torch.zeros(B, M, 16, 16, 16), torch.ones(B, 3, dtype=torch.bool))


@pytest.mark.parametrize("kwargs,argument", [
    (dict(depth=1), "depth"),
    (dict(depth=2.5), "depth"),
    (dict(base_channels=0), "base_channels"),
    (dict(max_channels=-1), "max_channels"),
    (dict(num_classes=True), "num_classes"),
    (dict(negative_slope=-0.1), "negative_slope"),
    (dict(backend="gpu"), "backend"),
    (dict(deep_supervision="yes"), "deep_supervision"),
])
@pytest.mark.parametrize("name", ["unet3d", "slsnet"])
def test_bad_constructor_arguments_are_refused(name, kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}"):
        build_model(name, **{**TINY, **kwargs})


@pytest.mark.parametrize("kwargs,argument", [
    (dict(fusion="sum"), "fusion"),
    (dict(align_levels=[3]), "align_levels"),
    (dict(align_levels=4), "align_levels"),
    (dict(num_modalities=0), "num_modalities"),
])
def test_bad_slsnet_arguments_are_refused(kwargs, argument):
    with pytest.raises(ValueError, match=f"^{argument}"):
        SLSNet(**{**TINY, **kwargs})


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="unet3d.*slsnet"):
        build_model("vnet")


# ----------------------------------------------------------------------------------------------
# Rebuilding from config()
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=VARIANT_IDS)
def test_build_model_from_config(name, kwargs):
    model = make(name, **kwargs, deep_supervision=False, num_classes=4)
    assert isinstance(model, MODEL_CLASSES[name])
    config = json.loads(json.dumps(model.config()))
    rebuilt = build_model(name, **config)
    assert type(rebuilt) is type(model)
    assert rebuilt.config() == model.config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    build_model(name, **{**config, "fused": False}).load_state_dict(model.state_dict(), strict=True)


# ----------------------------------------------------------------------------------------------
# Autocast and torch.compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=VARIANT_IDS)
def test_autocast_bfloat16(name, kwargs):
    model = randomise(make(name, **kwargs)).to(memory_format=torch.channels_last_3d)
    x = image().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, MASK, return_all=True)
    assert out.logits[0].dtype == torch.bfloat16
    assert all(torch.isfinite(t).all() for t in out.logits)
    sum(t.float().sum() for t in out.logits).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_torch_compile_slsnet():
    torch._dynamo.reset()
    model = randomise(make("slsnet", fusion="weighted", base_channels=2, depth=2))
    x = torch.randn(B, M, 8, 8, 8)
    eager_out, eager_dx, eager_grads = outputs_and_grads(model, x, MASK)
    # fullgraph: no graph break in the model (the eager call above has loaded the C++ extension)
    compiled = torch.compile(model, fullgraph=True)
    out, dx, grads = outputs_and_grads(compiled, x, MASK)
    tol = dict(atol=1e-4, rtol=1e-4)
    for a, b in zip(out, eager_out):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(dx, eager_dx, **tol)
    for key in grads:
        torch.testing.assert_close(grads[key], eager_grads[key.removeprefix("_orig_mod.")], **tol)
