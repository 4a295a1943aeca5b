"""SamplingOptions: validated settings; sample sets that do not depend on batching over ranks."""

import pytest
import torch
from helpers import random_model, small_config

from farmer.cli import build_parser, sampling_options
from farmer.evaluation import compare_inverses, generate
from farmer.guidance import NaiveGuidance, ResamplingGuidance
from farmer.pixels import model_to_pixels
from farmer.sampling import SamplingOptions


@pytest.mark.parametrize(("changes", "message"), [
    (dict(variance_scale=0.0), "variance_scale must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be"),
    (dict(inverse="backwards"), "inverse must be one of exact, jacobi, distilled"),
    (dict(batch_size=0), "batch_size must be an int >= 1"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(guidance=2.5), "guidance must implement farmer.guidance.Guidance"),
])
def test_bad_options_are_rejected(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**changes)


def test_cli_flags_build_one_options_value() -> None:
    args = build_parser().parse_args(["sample", "--guidance", "2.5", "--cfg", "naive", "--cfg-option",
                                      "max_mean_shift=2", "--variance-scale", "0.9", "--temperature", "1.3",
                                      "--inverse", "jacobi", "--batch-size", "7", "--seed", "3"])
    assert sampling_options(args) == SamplingOptions(guidance=NaiveGuidance(scale=2.5, max_mean_shift=2.0),
                                                     variance_scale=0.9, temperature=1.3, inverse="jacobi",
                                                     batch_size=7, seed=3)
    plain = build_parser().parse_args(["eval", "distill"])
    assert sampling_options(plain) == SamplingOptions()


def test_shards_concatenate_to_the_whole_set_and_one_batch_is_model_sample() -> None:
    model = random_model()
    labels = torch.arange(10) % 10
    options = SamplingOptions(guidance=ResamplingGuidance(scale=2.0), batch_size=3, seed=5)
    whole = generate(model, 10, labels, options)
    shards = [generate(model, 10, labels, options, shard=(rank, 3)) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 3, 4]  # batches of 3, 3, 3, 1: contiguous shares
    assert torch.equal(torch.cat(shards), whole)
    one_batch = [generate(model, 2, labels[:2], options, shard=(rank, 2)) for rank in range(2)]
    assert [len(s) for s in one_batch] == [0, 2]  # one batch, two ranks: one idles
    one = generate(model, 3, labels[:3], options)
    direct = model.sample(3, labels[:3], torch.Generator().manual_seed(5), guidance=options.guidance)
    assert torch.equal(one, whole[:3]) and torch.equal(one, model_to_pixels(direct))


def test_compare_inverses_exact_images_are_generate_images() -> None:
    model = random_model(small_config(distilled_inverse=True))
    options = SamplingOptions(batch_size=4, seed=2)
    report = compare_inverses(model, 6, options)
    assert torch.equal(report["images"]["exact"], generate(model, 6, report["labels"], options))
