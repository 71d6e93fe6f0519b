"""A mutation campaign over the engine (`make mutate`; not part of CI nor of `make test`).

- `sqlmut`: generates mutants of sql/functions/*.sql (stable ids: file:line:operator:n).
- `coverage_plugin`: a pytest plugin (`-p tests.mutation.coverage_plugin`) that records, per
  test, which tasker functions its database called (track_functions = 'all').
- `sql_mutants`: the SQL campaign (`python -m tests.mutation.sql_mutants`).
- `report`: the score table of both campaigns (SQL + mutmut on the Python core).

No module here is named test_*, so pytest never collects them.
"""
