"""udfs.session.build_session: the jobs' session settings and their precedence."""

from __future__ import annotations

import pytest

from udfs.session import build_session

pytestmark = pytest.mark.spark

KEY = "spark.sql.files.minPartitionNum"


@pytest.fixture
def clean(spark):
    spark.conf.unset(KEY)
    yield spark
    spark.conf.unset(KEY)


def test_input_files_are_split_at_least_twice_per_core_by_default(clean):
    session = build_session("sparkscore-test")
    assert session.conf.get(KEY) == str(2 * session.sparkContext.defaultParallelism)


def test_a_config_file_setting_wins_over_the_default_split(clean):
    session = build_session("sparkscore-test", {KEY: "3"})
    assert session.conf.get(KEY) == "3"
