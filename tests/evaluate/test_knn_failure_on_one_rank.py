"""A failure in the kNN evaluation on one rank is known to every rank before any collective would
wait for it: every rank raises the same error naming the rank, the trainer logs it and trains on."""

from __future__ import annotations

import json

import pytest
import timm
from accelerate import Accelerator

from hnmix.data.synthetic import make_synthetic_dataset
from hnmix.evaluate.features import EvalImages, extract_features, make_eval_loader
from launch import REPO, accelerate_launch


class Failing(EvalImages):
    def __getitem__(self, index):
        if int(index) >= 4:
            raise RuntimeError("injected")
        return super().__getitem__(index)


def test_one_process_raises_its_own_error_and_leaves_the_loader_closed():
    accelerator = Accelerator(cpu=True)
    images = Failing(make_synthetic_dataset(8, seed=0, image_size=32), image_column="image", label_column="label",
                     img_size=32)
    loader = accelerator.prepare(make_eval_loader(images, batch_size=4, num_workers=0))
    backbone = timm.create_model("test_resnet", num_classes=0).train()
    with pytest.raises(RuntimeError, match="^injected$"):  # the original error, its type and traceback
        extract_features(backbone, loader, accelerator)
    assert backbone.training
    # The abandoned pass is no longer Accelerate's active loader (a trainer's own loader would be again).
    assert not accelerator.gradient_state.in_dataloader


@pytest.mark.multiprocess
def test_a_failure_on_rank_1_reaches_both_ranks_at_once_and_training_goes_on(tmp_path):
    script = REPO / "tests" / "multiprocess" / "knn_failing_rank.py"
    done = accelerate_launch([str(script), str(tmp_path)], env={"HF_HUB_OFFLINE": "1"}, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [rank["world"] for rank in ranks] == [2, 2]
    for rank in ranks:
        first, second, third = rank["records"]
        # Both ranks know what failed where (a rank left waiting would report a gloo timeout instead).
        assert first == {"knn_error": "RankFailedError: feature extraction failed on rank 1 of 2: RuntimeError: "
                                      "injected failure in rank 1's dataset"}
        assert second == {"knn_error": "feature extraction failed on rank 1 of 2: image 13 cannot be decoded "
                                       "(injected); remove or replace it"}  # a user's error stays one line
        assert {"knn_top1", "knn_top5"} <= set(third)  # the monitor works again afterwards
        # Well under the process group's 60 s timeout: nobody waited for the failed rank.
        assert max(rank["seconds"][:2]) < 30, rank["seconds"]
        assert rank["ranks_after"] == 2  # the ranks' collectives still line up
    assert ranks[0]["records"][2] == ranks[1]["records"][2]
