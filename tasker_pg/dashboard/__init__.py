"""`tasker-pg dashboard`: the web UI (the `dashboard` extra: Starlette, uvicorn, Jinja2).

Importing this package needs none of them; `tasker_pg.dashboard.app` does.
"""
