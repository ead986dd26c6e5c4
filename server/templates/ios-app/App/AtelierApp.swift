// The app's entry point: one model store shared by the Generate and Benchmark screens.

import SwiftUI

@main
struct {{APP_TYPE}}: App {
    @StateObject private var store = ModelStore()

    var body: some Scene {
        WindowGroup {
            ContentView()
                .environmentObject(store)
                .task { await store.prepare() }
        }
    }
}
