"""`diffgentor dashboard`: a web view of batches, jobs and workers over the same `DG_*` settings as
every other command (docs/dashboard.md).

Modules: `config` (what the command was started with, and the bind/token rules), `security`
(token login, sessions, CSRF, response headers), `queries` (the reads a page needs beyond
`JobStore` and `worker.batches.BatchStore`), `images` (full images, thumbnails and edit inputs
proxied from storage), `app` (the Starlette app: routes, templates, error pages) and `command`
(the CLI sub-command, run by uvicorn). Needs the `dashboard` extra (Starlette, Jinja2, uvicorn);
nothing here is imported by the other commands.
"""
