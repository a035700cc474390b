"""The build generates the gRPC stubs from ../../proto/specontext.proto (build_stubs.py) into
specontext_client/_proto/ before setuptools collects the packages, so the generated code is in the
wheel but never in the repository."""
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import build_stubs  # noqa: E402

if os.path.isfile(build_stubs.DEFAULT_PROTO):
    build_stubs.build()
elif not os.path.isdir(os.path.join(HERE, "specontext_client", "_proto")):
    sys.exit("setup.py: no %s and no generated stubs: build from a SpeContext checkout"
             % build_stubs.DEFAULT_PROTO)

setup()
