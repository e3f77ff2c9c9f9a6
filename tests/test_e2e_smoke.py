from __future__ import annotations

from orchestration.services import start_run

from .conftest import wait_for_run


def test_a_three_step_chain_passes_each_output_on(worker, user):
    spec = {"chain": [{"skill": "echo"}, {"skill": "echo", "args": {"value": 2}}, {"skill": "echo"}]}
    run = wait_for_run(start_run(owner=user, spec=spec, input={"n": 1}))
    assert run.status == "succeeded"
    assert run.output == 2
    assert [s.output for s in run.steps.all()] == [{"n": 1}, 2, 2]
