"""The Python example: a Flask app (its one dependency, from PyPI) that greets.

``git push flynnp2p main`` builds it with the python buildpack (a virtualenv with
Flask in the slug); the Procfile runs it on the port the job is given.
"""

import os

import flask

app = flask.Flask(__name__)


@app.get("/")
def hello() -> flask.Response:
    greeting = os.environ.get("GREETING", "Hello from flynnp2p")
    job = os.environ.get("JOB_ID", "?")
    body = f"{greeting}: Python with Flask {flask.__version__}, job {job}\n"
    return flask.Response(body, mimetype="text/plain")


if __name__ == "__main__":
    app.run(host="0.0.0.0", port=int(os.environ.get("PORT", "5000")))
