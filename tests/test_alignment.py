"""Caption–image alignment: reference captions, the contrastive model (loss and margin against
float64 references, learning to rank true pairs above swapped ones), the diffusion margin against
a direct own-vs-other loss computation, and the `alignment` scorer end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from flax import nnx
from test_rate import TINY
from test_scoring import _perturbed

from alchemist_jax import alignment, models, scoring
from alchemist_jax.config import load_config
from alchemist_jax.data.tokenizer import END_ID, START_ID

LENGTH = 6  # token length of the synthetic captions


def _captions(words: np.ndarray) -> dict[str, np.ndarray]:
    """Captions of one or two words: [START, word(s), END, padding] (word ids (N,) or (N, 2))."""
    words = np.asarray(words).reshape(len(words), -1)
    n, count = words.shape
    tokens = np.full((n, LENGTH), END_ID, np.int32)
    tokens[:, 0] = START_ID
    tokens[:, 1 : 1 + count] = words
    mask = np.arange(LENGTH)[None] < count + 2
    return {"tokens": tokens, "token_mask": np.repeat(mask, n, axis=0)}


def _class_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """(N, 8, 8, 1) images in [-1, 1]: a bright 4x4 quadrant (the label, 0..3) on noise."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1.0, -0.4, (len(labels), 8, 8, 1)).astype(np.float32)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 2)
        images[i, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = 0.8
    return images


# ----------------------------------------------------------------------------------------------
# Reference captions
# ----------------------------------------------------------------------------------------------


def test_reference_captions_are_the_distinct_captions_capped_at_count():
    captions = _captions(np.array([7, 5, 7, 9, 5, 11]))
    every = alignment.reference_captions(captions, 10, seed=0)
    np.testing.assert_array_equal(every["tokens"][:, 1], [7, 5, 9, 11])  # first occurrences
    assert every["token_mask"].shape == (4, LENGTH)
    some = alignment.reference_captions(captions, 2, seed=0)
    assert len(some["tokens"]) == 2 and len(set(some["tokens"][:, 1])) == 2
    assert set(some["tokens"][:, 1]) <= {7, 5, 9, 11}
    np.testing.assert_array_equal(
        alignment.reference_captions(captions, 2, seed=0)["tokens"], some["tokens"]
    )
    # Same tokens under another mask are another caption.
    masked = dict(captions, token_mask=captions["token_mask"].copy())
    masked["token_mask"][2, 3] = True
    assert len(alignment.reference_captions(masked, 10, seed=0)["tokens"]) == 5
    with pytest.raises(ValueError, match="alignment_references"):
        alignment.reference_captions(captions, 0, seed=0)


# ----------------------------------------------------------------------------------------------
# The contrastive model
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def contrastive64():
    """A randomly initialised contrastive model in float64 and a batch of 4 pairs, rows 1 and 3
    with the same caption."""
    labels = np.array([0, 1, 2, 1])
    batch = {
        "image": _class_images(labels, 0).astype(np.float64),
        **_captions(np.array([320, 321, 322, 321])),
    }
    graphdef, params, rest = alignment.init_contrastive(batch, jax.random.key(0), width=8, dim=6)
    return graphdef, jax.tree.map(lambda x: np.asarray(x, np.float64), params), rest, batch


def _embeddings(model, batch):
    return (
        np.asarray(model.embed_images(batch["image"])),
        np.asarray(model.embed_captions(batch)),
        float(model.scale()),
    )


def _log_softmax(x):
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def test_contrastive_loss_matches_a_float64_reference(contrastive64):
    graphdef, params, rest, batch = contrastive64
    with jax.enable_x64(True):
        model = nnx.merge(graphdef, params, rest)
        images, captions, scale = _embeddings(model, batch)
        loss = float(alignment.contrastive_loss(model, batch))
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, rtol=1e-12)
    logits = scale * images @ captions.T
    targets = np.eye(4)
    targets[1, 3] = targets[3, 1] = 1.0  # the same caption: both are positives of rows 1 and 3
    targets /= targets.sum(1, keepdims=True)
    expected = -0.5 * (
        np.sum(targets * _log_softmax(logits)) / 4 + np.sum(targets * _log_softmax(logits.T)) / 4
    )
    assert loss == pytest.approx(expected, rel=1e-12)


def test_contrastive_margin_is_the_log_softmax_of_the_own_caption(contrastive64):
    graphdef, params, rest, batch = contrastive64
    references = _captions(np.array([320, 400, 401]))  # the first is row 0's own caption
    with jax.enable_x64(True):
        margin = np.asarray(
            alignment.contrastive_margin_fn(graphdef, rest, references)(params, batch)
        )
        model = nnx.merge(graphdef, params, rest)
        images, own, scale = _embeddings(model, batch)
        reference_embeddings = np.asarray(model.embed_captions(references))
    for row in range(4):
        others = [k for k in range(3) if not (row == 0 and k == 0)]
        logits = scale * np.concatenate(
            [[images[row] @ own[row]], images[row] @ reference_embeddings[others].T]
        )
        assert margin[row] == pytest.approx(_log_softmax(logits)[0], rel=1e-12), row
    assert np.all(margin < 0)


def test_augment_shifts_each_image_and_jitters_its_brightness():
    image = -np.ones((1, 9, 9, 1), np.float32)
    image[0, 4, 4] = 1.0
    out = np.asarray(
        alignment.augment(jnp.repeat(image, 16, axis=0), jax.random.key(3), max_shift=2)
    )
    assert out.shape == (16, 9, 9, 1) and out.min() >= -1 and out.max() <= 1
    peaks = [np.unravel_index(np.argmax(o[..., 0]), (9, 9)) for o in out]
    assert all(2 <= r <= 6 and 2 <= c <= 6 for r, c in peaks)
    assert len(set(peaks)) > 3  # shifts differ between images
    background = out[:, 0, 0, 0]  # -1 * scale + offset, clipped
    assert np.all(background <= -0.8) and len(np.unique(background)) > 3


def test_trained_contrastive_model_ranks_true_pairs_above_swapped_ones():
    labels = np.arange(64) % 4
    words = 320 + labels  # the caption is the label
    data = {"image": _class_images(labels, 1), **_captions(words)}
    settings = alignment.ContrastiveTraining(
        steps=120, batch_size=32, learning_rate=3e-3, width=8, dim=16, max_shift=1
    )
    graphdef, params, rest = alignment.train_contrastive(data, settings, seed=0)
    references = alignment.reference_captions(data, 16, seed=0)
    margin = alignment.contrastive_margin_fn(graphdef, rest, references)
    test_labels = np.arange(32) % 4
    images = _class_images(test_labels, 2)  # unseen images
    true = np.asarray(margin(params, {"image": images, **_captions(320 + test_labels)}))
    swapped = np.asarray(
        margin(params, {"image": images, **_captions(320 + (test_labels + 1) % 4)})
    )
    assert true.min() > swapped.max()
    assert true.mean() > np.log(0.9)  # P(own caption) > 0.9 among the 4 captions

    again = alignment.train_contrastive(data, settings, seed=0)[1]
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again))
    )


# ----------------------------------------------------------------------------------------------
# The diffusion margin
# ----------------------------------------------------------------------------------------------


def test_diffusion_margin_is_the_own_vs_other_loss_difference():
    cfg = load_config("configs/demo.yaml", TINY)
    rng = np.random.default_rng(0)
    words = np.array([[330, 331], [332, 333], [334, 335]])
    batch = {"image": rng.uniform(-1, 1, (3, 28, 28, 1)), **_captions(words)}
    references = _captions(np.array([[330, 331], [340, 341], [342, 343], [344, 345]]))
    ids = np.array([5, 2**33 + 7, 11])
    low, high = models.split_ids(ids)
    graphdef, params, rest = models.init_proxy(cfg.model, batch, jax.random.key(0), LENGTH)
    with jax.enable_x64(True):
        params, rest = jax.tree.map(
            lambda x: np.asarray(x, np.float64), (_perturbed(params, 0.05), rest)
        )
        margin = np.asarray(
            alignment.diffusion_margin_fn(graphdef, rest, references, draws=2, seed=3, t_min=0.4)(
                params, batch, low, high
            )
        )
        loss = jax.jit(
            lambda b, t, eps: models.flow_matching_loss_at(
                nnx.merge(graphdef, params, rest), b, t, eps
            )
        )
        direct = np.zeros((2, 3))
        for draw in range(2):
            t, eps = models.fixed_draws(3, draw, low, high, (28, 28, 1))
            t = 0.4 + 0.6 * np.asarray(t)
            assert t.min() >= 0.4
            for row in range(3):
                own = float(
                    loss(
                        {k: v[row : row + 1] for k, v in batch.items()},
                        t[row : row + 1],
                        eps[row : row + 1],
                    )[0]
                )
                others = [k for k in range(4) if not (row == 0 and k == 0)]  # row 0's own
                losses = [
                    float(
                        loss(
                            {
                                "image": batch["image"][row : row + 1],
                                **{key: value[k : k + 1] for key, value in references.items()},
                            },
                            t[row : row + 1],
                            eps[row : row + 1],
                        )[0]
                    )
                    for k in others
                ]
                direct[draw, row] = np.mean(losses) - own
    assert np.abs(direct).min() > 1e-4  # captions matter to this proxy
    np.testing.assert_allclose(margin, direct.mean(axis=0), rtol=1e-9)
    with pytest.raises(ValueError, match="alignment_t_min"):
        alignment.diffusion_margin_fn(graphdef, rest, references, draws=1, seed=0, t_min=1.0)


# ----------------------------------------------------------------------------------------------
# The scorer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, extra",
    [
        ("contrastive", ["score.alignment_steps=4"]),
        ("diffusion", ["score.proxy_steps=2", "score.draws=1", "score.alignment_references=3"]),
    ],
)
def test_alignment_scorer_writes_ratings_and_then_skips(tmp_path, method, extra):
    cfg = load_config(
        "configs/demo.yaml",
        TINY
        + [
            "score.scorer=alignment",
            f"score.alignment_method={method}",
            "score.batch_size=32",
            "train.batch_size=8",
            *extra,
        ],
    )
    out = tmp_path / "alignment.parquet"
    summary = scoring.run(cfg, out)
    table = pq.read_table(out)
    assert table.num_rows == summary["count"] == 96 and summary["seconds"] > 0
    scores = table.column("score").to_numpy()
    assert np.all(np.isfinite(scores)) and scores.std() > 0
    if method == "contrastive":
        assert np.all(scores <= 0)  # a log-probability
    metadata = scoring.read_metadata(out)
    assert metadata["scorer"] == "alignment"
    assert metadata["config_sha256"] == scoring.config_fingerprint(cfg)
    assert not scoring.chunk_folder(out).exists()
    assert scoring.run(cfg, out)["seconds"] == 0  # complete: nothing is scored again


def test_alignment_fingerprint_follows_the_method_settings():
    def fingerprint(*extra):
        return scoring.config_fingerprint(load_config(None, ["score.scorer=alignment", *extra]))

    contrastive, diffusion = (), ("score.alignment_method=diffusion",)
    assert fingerprint(*contrastive) != fingerprint(*diffusion)
    assert fingerprint(*contrastive, "score.alignment_steps=7") != fingerprint(*contrastive)
    assert fingerprint(*contrastive, "train.learning_rate=0.5") == fingerprint(*contrastive)
    assert fingerprint(*contrastive, "score.proxy_steps=7") == fingerprint(*contrastive)
    assert fingerprint(*diffusion, "train.learning_rate=0.5") != fingerprint(*diffusion)
    assert fingerprint(*diffusion, "score.alignment_t_min=0.2") != fingerprint(*diffusion)
    assert fingerprint(*diffusion, "score.alignment_steps=7") == fingerprint(*diffusion)
