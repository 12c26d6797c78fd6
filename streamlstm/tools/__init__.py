"""The tools beside the service: the demo (local broker, simulated plant), CSV replay, NAB
scoring and the evaluation on labelled corpora. The daemon never imports them."""
