"""Job-submission helpers shared by the scripts that start their own local clusters."""

import time

from ray.job_submission import JobStatus, JobSubmissionClient

FINISHED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def submit_when_ready(client: JobSubmissionClient, entrypoint: str, timeout_s: float = 120) -> str:
    """Submit once the head's job agent is up: right after start, the dashboard answers
    500 "No available agent to submit job" for a while (longer on a loaded machine)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2)


def wait_until_finished(client: JobSubmissionClient, job_id: str, timeout_s: float, every=None) -> JobStatus:
    """Poll the job's status until it finishes (or the timeout); `every()` runs at each poll."""
    deadline = time.time() + timeout_s
    status = JobStatus.PENDING
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if every is not None:
            every()
        if status in FINISHED:
            break
        time.sleep(1)
    return status
