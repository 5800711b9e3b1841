from router.stop_strings import StopStringMatcher


def run(stop, deltas):
    matcher = StopStringMatcher(stop)
    sent, matched = [], False
    for delta in deltas:
        out, matched = matcher.feed(delta)
        sent.append(out)
        if matched:
            break
    if not matched:
        sent.append(matcher.flush())
    return sent, matched


def test_no_stop_strings_passes_through():
    assert run([], ["ab", "cd"]) == (["ab", "cd", ""], False)


def test_stop_inside_one_delta_cuts_before_it():
    assert run(["END"], ["abcENDxyz"]) == (["abc"], True)


def test_stop_straddling_deltas_is_never_sent():
    sent, matched = run(["END"], ["ab", "cE", "N", "Dzz"])
    assert matched
    assert "".join(sent) == "abc"
    assert sent == ["ab", "c", "", ""]


def test_false_start_is_released():
    sent, matched = run(["END"], ["aE", "Nx", "y"])
    assert not matched
    assert sent == ["a", "ENx", "y", ""]


def test_held_back_tail_is_flushed_at_the_end():
    sent, matched = run(["END"], ["abEN"])
    assert not matched
    assert sent == ["ab", "EN"]


def test_earliest_of_several_stops_wins():
    assert run(["yz", "b"], ["abcxyz"]) == (["a"], True)
