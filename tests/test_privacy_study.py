"""The privacy study's membership check (lab/safedlora_lab/privacy_study.py) on a tiny finished run."""

import pytest

from safedlora_app.core.run_folder import RunFolder
from safedlora_lab.privacy_study import clip_from, loss_auc, membership_auc

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


def test_the_membership_check_reads_who_trained_and_scores_the_final_model(finished_run):
    _, run_dir, rows, _ = finished_run(num_server_rounds=2)
    assert [r["trained"] for r in rows[1:]] == [["partition-0", "partition-1"]] * 2
    auc = membership_auc(RunFolder(run_dir), nodes=2, rows=64)
    assert 0.0 <= auc <= 1.0


def test_the_attack_scores_the_share_of_pairs_where_the_member_has_the_lower_loss():
    assert loss_auc([0.1, 0.2], [0.3, 0.4]) == 1.0 and loss_auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert loss_auc([0.1, 0.3], [0.2, 0.3]) == pytest.approx((1 + 0.5 + 1 + 0) / 4)  # one tie, one pair each way


def test_the_clip_is_the_median_of_the_rounds_median_norms(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(
        f'{{"round": {t}, "dp-norm": {n}}}\n' for t, n in enumerate([None, 0.0123, 0.0456, 0.0311])).replace(
        "None", "null"))
    assert clip_from(RunFolder(tmp_path)) == 0.031
