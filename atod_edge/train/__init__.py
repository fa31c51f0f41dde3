"""The ATOD training core (imported as atod_edge.train).

Pure tensor functions, one short module per idea of ../shared/ATOD.md:
schedule (section 3), advantages (sections 1-3), tdur (section 4), loss (section 5).
"""
