"""`quiet_failures` holds back the noise a failed restore leaves (issue 16, item 4), run in a subprocess
whose stderr is the console: absl log records with tracebacks, an asyncio task whose exception is never
retrieved (logged with a traceback when the task is collected), a callback that finds its event loop
closed in another thread, and an unraisable exception. A failed block shows none of it; a block that
succeeds shows its records as they came."""
import subprocess
import sys
import textwrap

import runner

SCRIPT = textwrap.dedent("""
    import asyncio, importlib.util, sys, threading
    from absl import logging
    spec = importlib.util.spec_from_file_location("quiet", sys.argv[1])  # without importing jax
    quiet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quiet)
    quiet_failures = quiet.quiet_failures

    def noisy(tag):
      try:
        raise OSError("disk says no")
      except OSError:
        logging.error("%s: orbax-like error with traceback", tag, exc_info=True)
      loop = asyncio.new_event_loop()

      async def fails():
        raise RuntimeError(f"{tag}: task exception")

      task = loop.create_task(fails())
      loop.run_until_complete(asyncio.sleep(0))  # the task fails; nobody retrieves its exception
      loop.close()
      del task

      def late_callback():  # a tensorstore-like callback after the loop closed
        loop.call_soon_threadsafe(print, "never")
      t = threading.Thread(target=late_callback)
      t.start()
      t.join()

      class Bad:
        def __del__(self):
          raise ValueError(f"{tag}: unraisable")
      Bad()

    with quiet_failures() as q:
      noisy("FAILED")
      q.failed()
    print("after failure", flush=True)
    with quiet_failures():
      logging.warning("SUCCEEDED: kept")
    print("done", flush=True)
    print("REFERENCE", file=sys.stderr, flush=True)
    noisy("UNCONTAINED")  # the reference: the same noise without quiet_failures reaches the console
""")


def test_failed_block_is_silent_and_successful_block_is_replayed(tmp_path):
  r = subprocess.run([sys.executable, "-c", SCRIPT, str(runner.REPO / "jaxddpm" / "quiet.py")], capture_output=True,
                     text=True, timeout=120, env=runner.env(tmp_path / "cache"))
  assert r.returncode == 0, r.stderr
  assert r.stdout == "after failure\ndone\n", r.stdout
  contained, reference = r.stderr.split("REFERENCE\n")
  assert "FAILED" not in contained and "Traceback" not in contained, contained
  assert "Event loop is closed" not in contained, contained
  assert "SUCCEEDED: kept" in contained and contained.count("\n") == 1, contained
  # so the assertions above can fail: each kind of noise does reach the console when not contained
  for text in ("UNCONTAINED: orbax-like error with traceback", "Task exception was never retrieved",
               "Event loop is closed", "UNCONTAINED: unraisable"):
    assert text in reference, (text, reference[-3000:])
