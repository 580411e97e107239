import collections, atexit
from tests.service.test_schemathesis import *  # noqa
import tests.service.test_schemathesis as m
SEEN = collections.Counter()
@m.schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_dbg(case, main_server):
    r = case.call_and_validate(base_url=main_server.url, checks=CHECKS, timeout=60)
    SEEN[(case.method, case.path, case.media_type, r.status_code)] += 1
def test_zz_print():
    for k, v in sorted(SEEN.items(), key=str): print(k, v)
