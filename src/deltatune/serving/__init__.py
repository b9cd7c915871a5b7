"""``deltatune serve``: many adapters on one frozen base model behind an OpenAI-compatible HTTP API.

* :mod:`~deltatune.serving.decoding`: one request's sampling, stop strings and streamed text;
* :mod:`~deltatune.serving.batcher`: the continuous-batching loop (one thread owns the model);
* :mod:`~deltatune.serving.adapters`: which adapter folders a server may read, and which it can serve;
* :mod:`~deltatune.serving.api`: the FastAPI application (routes, errors, auth, metrics);
* :mod:`~deltatune.serving.server`: loading the model and running uvicorn with a graceful drain.
"""
