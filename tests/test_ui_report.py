"""
What the user and scripts are told about identical files (skipped),
resumed data, names left out with --skip-unsafe, and text messages.
"""

import io
import json

from twisted.trial.unittest import SynchronousTestCase

from p2pft.transfer import Offer, Result
from p2pft.ui import HumanUI, JsonUI


class ReportTests(SynchronousTestCase):
    def test_identical_files_are_not_called_resumed(self):
        err = io.StringIO()
        HumanUI(err=err).done(Result("t", 3_000_000, 1.0, "/o/t", 2, resumed=1_000_000, skipped=2_000_000), "direct")
        line = err.getvalue()
        self.assertIn("2.0 MB already there and identical (checked, not sent)", line)
        self.assertIn("1.0 MB of it already there (resumed)", line)
        self.assertIn("(0.0 MB/s, direct)", line)  # nothing moved

    def test_refused_names_are_listed_before_asking(self):
        err = io.StringIO()
        offer = Offer(2, 1, 9, ["t/"], 1, refused=23, refused_names=tuple(f"'t/aux{i}.c': reserved" for i in range(20)))
        ui = HumanUI(err=err, assume_yes=True)
        self.successResultOf(ui.decide(offer))
        text = err.getvalue()
        self.assertIn("Leaving out 23 entries whose names cannot be written here (--skip-unsafe):", text)
        self.assertIn("  't/aux19.c': reserved", text)
        self.assertIn("  and 3 more", text)

    def test_json_events_carry_skipped_and_refused(self):
        out = io.StringIO()
        ui = JsonUI(out=out, err=io.StringIO(), assume_yes=True)
        self.successResultOf(ui.decide(Offer(1, 0, 5, ["a"], 1, refused=1, refused_names=("'x:y': no",))))
        ui.done(Result("a", 5, 0.5, "/o/a", 1, skipped=5, refused=1), "relay")
        offer, done = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual((offer["refused"], offer["refused_names"]), (1, ["'x:y': no"]))
        self.assertEqual((done["skipped"], done["resumed"], done["refused"]), (5, 0, 1))

    def test_text_goes_to_stdout_escaped_and_json_keeps_it_exact(self):
        out, err = io.StringIO(), io.StringIO()
        HumanUI(err=err, out=out).text("line\n\x1b]0;title\x07")
        self.assertEqual(out.getvalue(), "line\n\\x1b]0;title\\x07\n")
        out = io.StringIO()
        JsonUI(out=out, err=io.StringIO()).text("line\n\x1b")
        self.assertEqual(json.loads(out.getvalue()), {"event": "text", "text": "line\n\x1b"})
