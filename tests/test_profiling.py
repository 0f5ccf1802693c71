"""Named timing stages: free unless recording, one entry per call while recording."""

import time

from nfsd_nerf.profiling import record_stages, stage


def test_stages_are_recorded_only_inside_record_stages():
    with stage("outside"):
        pass
    with record_stages() as rec:
        for _ in range(3):
            with stage("sleep"):
                time.sleep(0.01)
        with stage("nested"), stage("inner"):
            pass
    assert set(rec.times) == {"sleep", "nested", "inner"} and "outside" not in rec.times
    assert len(rec.times["sleep"]) == 3 and all(0.009 <= t < 0.5 for t in rec.times["sleep"])
    with stage("after"):
        pass
    assert "after" not in rec.times


def test_a_stage_that_raises_is_still_timed():
    with record_stages() as rec:
        try:
            with stage("fails"):
                raise ValueError
        except ValueError:
            pass
    assert len(rec.times["fails"]) == 1
