"""Hypothesis-generated HTTP requests against a real server (see bench/fuzz.py for the strategies):
no 5xx, no answer later than its deadline plus one second, and the server ready and scoring after.
``make fuzz`` runs the long campaign."""

from __future__ import annotations

import os

import pytest

from bench.fuzz import DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS, TOKEN, campaign

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("SPARKSCORE_FUZZ_EXAMPLES", "300"))


def test_generated_requests_get_no_5xx_answer_within_their_deadline_and_leave_the_server_healthy(
    serve, ctr_model
):
    srv = serve(
        token=TOKEN,
        batcher={"default_timeout_ms": DEFAULT_TIMEOUT_MS, "max_timeout_ms": MAX_TIMEOUT_MS},
        server={"max_instances": 64},
    )
    result = campaign(srv.url, ctr_model.version, EXAMPLES)
    assert result["problems"] == [], result["problems"][:5]
    assert result["healthy_after"] == "yes"
    assert result["requests"] == EXAMPLES
    # The generator reaches past the door: some requests were scored, some refused as bad input.
    assert result["by_status"].get("200", 0) > 0 and result["by_status"].get("422", 0) > 0
